"""What fc2 smoothing costs at run time: the built-in model's W8A8 graph with and without the per-channel
Mul on each block's GELU output (issue 13 item 6), run by ONNX Runtime on the CPU with one thread.

A benchmark, not a test; it writes bench/results/fc2_mul_cost.json:

    OMP_NUM_THREADS=1 .venv/bin/python bench/fc2_mul_cost.py

Both recipes are SmoothQuant alpha 1.0 W8A8 from the same recording, one with ``smooth_fc2``. The two
graphs are timed side by side in one process, alternating calls (so load from other jobs hits both
alike), at the sampler's batch sizes (one and 16 images with guidance: 2 and 32 rows); the median
per call is the time of one sampling step. ONNX Runtime's own profile of the smoothed graph gives the
Mul nodes' share of each call directly, and its optimized graph says which kernels run around them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

from ditrt.calibrate.methods import SmoothQuantSettings
from ditrt.calibrate.ptq import CalibrateConfig, calibrate
from ditrt.contracts.files import atomic_write
from ditrt.contracts.recipe import CalibrationSettings
from ditrt.contracts.spec import DiTSpec
from ditrt.diffusion.recording import record_calibration_inputs
from ditrt.export import check_onnx, export_onnx
from ditrt.models.builtin import load_model
from ditrt.runtime.onnxruntime_backend import DISABLED_OPTIMIZERS, SESSION_CONFIG, make_session

#: a short recording: the graphs' structure, not their quality, is measured here
SETTINGS = CalibrationSettings(steps="50", timesteps=8, samples=8)


def _session(path: Path, *, profile_prefix: str | None = None):
    """make_session's settings, one thread, with ONNX Runtime's profiler on when ``profile_prefix`` is given."""
    if profile_prefix is None:
        return make_session(path, threads=1)
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = 1, 1
    for key, value in SESSION_CONFIG.items():
        so.add_session_config_entry(key, value)
    so.enable_profiling, so.profile_file_prefix = True, profile_prefix
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"], disabled_optimizers=list(DISABLED_OPTIMIZERS))


def _feeds(model, rows: int) -> dict:
    x, t, y = DiTSpec(model.config).sample_inputs(rows, seed=rows)
    return {"x": x.numpy(), "t": t.numpy(), "y": y.numpy()}


def side_by_side(sessions: dict, feeds: dict, rounds: int) -> dict:
    """Median and minimum ms per call of each session, calls alternating, after one warm-up call each."""
    times = {name: [] for name in sessions}
    for s in sessions.values():
        s.run(["out"], feeds)
    for _ in range(rounds):
        for name, s in sessions.items():
            t0 = time.perf_counter()
            s.run(["out"], feeds)
            times[name].append(1e3 * (time.perf_counter() - t0))
    return {name: {"median_ms": statistics.median(v), "min_ms": min(v)} for name, v in times.items()}


def profiled_mul_share(path: Path, feeds: dict, calls: int, tmp: Path) -> dict:
    """From ONNX Runtime's profile of ``calls`` runs: the smoothing Muls' and all nodes' kernel time per call (ms)."""
    session = _session(path, profile_prefix=str(tmp / "profile"))
    session.run(["out"], feeds)  # warm-up, dropped below with the session set-up events
    for _ in range(calls):
        session.run(["out"], feeds)
    events = json.loads(Path(session.end_profiling()).read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    start = runs[1]["ts"]  # the first measured run
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start]
    mul = sum(e["dur"] for e in nodes if "input_smooth" in e["name"])
    return {"mul_ms_per_call": mul / 1e3 / calls, "kernels_ms_per_call": sum(e["dur"] for e in nodes) / 1e3 / calls,
            "mul_nodes_per_call": sum("input_smooth" in e["name"] for e in nodes) / calls}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[2, 32], help="batch rows per call (2 per image with guidance)")
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--out", type=Path, default=Path("bench/results/fc2_mul_cost.json"))
    args = p.parse_args()
    torch.set_num_threads(1)
    model = load_model("builtin")
    batches = record_calibration_inputs(model, SETTINGS, pixel_space=True)
    results = {"model": "builtin", "recipe": "smoothquant alpha 1.0 w8a8 (fp32 graph)", "threads": 1, "rounds": args.rounds, "rows": {}}
    with tempfile.TemporaryDirectory(prefix="fc2-cost-") as tmp:
        tmp = Path(tmp)
        paths = {}
        for name, fc2 in (("plain", False), ("fc2_smoothed", True)):
            config = CalibrateConfig(method="smoothquant", method_settings=SmoothQuantSettings(alpha=1.0), smooth_fc2=fc2, calibration=SETTINGS)
            recipe, tensors = calibrate(model, config, batches)
            paths[name] = export_onnx(model, tmp / f"{name}.onnx", recipe=recipe, tensors=tensors)
            assert check_onnx(paths[name]) == [], name
        make_session(paths["fc2_smoothed"], threads=1, optimized_model_path=tmp / "optimized.onnx")
        optimized = onnx.load(str(tmp / "optimized.onnx")).graph
        producer = {o: n for n in optimized.node for o in n.output}
        muls = [n for n in optimized.node if "input_smooth" in n.name]
        results["onnxruntime_graph"] = {
            "smoothing_nodes": [f"{n.op_type} ({n.name})" for n in muls][:2] + [f"... {len(muls)} in all"],
            "fed_by": sorted({producer[n.input[0]].op_type for n in muls if n.input[0] in producer}),
            "int8_matmuls": sum(n.op_type == "MatMulIntegerToFloat" for n in optimized.node),
        }
        sessions = {name: make_session(path, threads=1) for name, path in paths.items()}
        for rows in args.rows:
            feeds = _feeds(model, rows)
            timed = side_by_side(sessions, feeds, args.rounds)
            prof = profiled_mul_share(paths["fc2_smoothed"], feeds, min(args.rounds, 50), tmp)
            plain, smoothed = timed["plain"]["median_ms"], timed["fc2_smoothed"]["median_ms"]
            results["rows"][rows] = {**timed, "difference_ms": smoothed - plain, "difference_pct": 100 * (smoothed - plain) / plain,
                                     "profile": {**prof, "mul_pct_of_kernels": 100 * prof["mul_ms_per_call"] / prof["kernels_ms_per_call"]}}  # fmt: skip
            print(f"{rows} rows: plain {plain:.3f} ms, smoothed {smoothed:.3f} ms per call (median of {args.rounds}); "
                  f"the {prof['mul_nodes_per_call']:.0f} Muls {prof['mul_ms_per_call'] * 1e3:.1f} us per call "
                  f"({results['rows'][rows]['profile']['mul_pct_of_kernels']:.2f}% of kernel time)")  # fmt: skip
    results["loadavg"] = [round(v, 2) for v in os.getloadavg()]
    results["numpy"], results["torch"] = np.__version__, torch.__version__
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, lambda t: t.write_text(json.dumps(results, indent=2)))
    print(json.dumps(results["onnxruntime_graph"]))


if __name__ == "__main__":
    main()
