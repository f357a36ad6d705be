"""The prepared GPU check (issue 12, item 5): one command, one JSON file, under 8 minutes on one CUDA GPU.

    PYTHONUNBUFFERED=1 python3 bench/gpu_check.py                  # on a CUDA machine: DiT-XL/2
    .venv/bin/python bench/gpu_check.py --quick                    # here (CPU): DiT-S/2, tiny settings

What it runs, each part timed and recorded even when another fails:

1. ``environment``: torch, CUDA, the GPU, TensorRT (whether it imports), ditrt and its git commit.
2. ``calibrate``: a randomly initialised DiT-XL/2 calibrated on the device with PTQ4DiT W8A8 on the
   paper's calibration set (25 recorded timesteps x 32 samples of a 250-step run, cfg 1.5): the seconds
   of recording and of ``calibrate()``, and the peak GPU memory (``torch.cuda.max_memory_allocated``).
3. ``sampling``: the float model against the simulated W8A8 recipe (:mod:`ditrt.models.quantized`) in
   the real sampler loop, side by side in one process (alternated, best of 2 rounds): 32 images at 50
   steps with guidance (64 rows per call), ms per step and their ratio (fp32 both; the simulation fake-quantizes in float, so it is a
   correctness path, not a speed path: the speed path is TensorRT).
4. ``export``: the calibrated recipe exported to the fp16 Q/DQ ONNX graph TensorRT builds, checked by
   ``check_onnx``: seconds, file size, peak RSS.
5. ``distributed``: ``torchrun --nproc_per_node 1 -m ditrt sample`` of a small random checkpoint on the
   device (NCCL on CUDA, gloo here), and the same command without torchrun: the two sample files must
   be bit-identical.
6. ``tensorrt_tests``: ``pytest tests/tensorrt``, which must skip with its reason where TensorRT is absent.

The JSON is rewritten after every part (atomically), so a run cut short still leaves what it measured.
Default output: ``bench/results/gpu_check-<device>.json``. Random weights: quality is not measured here.

On the lent GPU machine (CUDA torch and onnx/onnxruntime are there; polygraphy and diffusers are not:
carry their wheels as the device tool's README says, or the parts that need them report the import
error): ``PYTHONPATH=. python3 bench/gpu_check.py --out $OUT/gpu_check.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

BUDGET_S = 8 * 60  # the whole check must end within this; later parts are skipped past it (said in the JSON)


class Check:
    """Runs the parts, records each (status, seconds, numbers or one-line error) and rewrites the JSON after each."""

    def __init__(self, out: Path, args):
        self.out, self.args, self.start = out, args, time.perf_counter()
        self.result = {"script": "bench/gpu_check.py", "args": vars(args), "parts": {}}

    def part(self, name: str, fn, *, needs_cuda: bool = False):
        if needs_cuda and self.args.device == "cpu":
            self.result["parts"][name] = {"status": "skipped", "reason": "needs a CUDA GPU (this run is on the CPU)"}
        elif time.perf_counter() - self.start > BUDGET_S:
            self.result["parts"][name] = {"status": "skipped", "reason": f"the {BUDGET_S} s budget was spent by the parts before it"}
        else:
            t0 = time.perf_counter()
            print(f"== {name}", flush=True)
            try:
                rec = {"status": "ok", **(fn() or {})}
            except Exception as e:  # a part that fails is a result: record it and go on
                rec = {"status": "failed", "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                       "traceback_tail": traceback.format_exc().splitlines()[-6:]}  # fmt: skip
            rec["seconds"] = round(time.perf_counter() - t0, 2)
            self.result["parts"][name] = rec
            print(json.dumps(rec, indent=1)[:2000], flush=True)
        self.result["total_seconds"] = round(time.perf_counter() - self.start, 2)
        self.write()
        return self.result["parts"][name]

    def write(self):
        from ditrt.contracts.files import atomic_write

        self.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.out, lambda tmp: tmp.write_text(json.dumps(self.result, indent=2, default=str) + "\n"))


def environment(args) -> dict:
    import torch

    import ditrt
    from ditrt.engines.build import tensorrt_available

    ok, why = tensorrt_available()
    env = {"python": platform.python_version(), "machine": platform.machine(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cuda_available": torch.cuda.is_available(), "tensorrt": ok, "tensorrt_reason": why, "ditrt": ditrt.__version__,
           "cpus": os.cpu_count()}  # fmt: skip
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        env["git_commit"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, capability=f"{p.major}.{p.minor}", gpu_memory_gib=round(p.total_memory / 2**30, 1))
    for name in ("onnx", "onnxruntime", "polygraphy", "diffusers"):
        try:
            env[name] = __import__(name).__version__
        except ImportError as e:
            env[name] = f"missing ({e})"
    return env


def random_model(config: str, seed: int = 0):
    """The export bench's random DiT of the official layout (every all-zero adaLN-Zero parameter refilled)."""
    from export_scale import random_model as bench_model  # bench/export_scale.py

    return bench_model(config, seed)


class State:
    """What the parts hand on: the model, the recipe."""

    model = recipe = tensors = None


def calibrate_part(args, state: State) -> dict:
    import torch

    from ditrt.calibrate.config import CalibrateConfig
    from ditrt.calibrate.ptq import calibrate
    from ditrt.contracts.recipe import CalibrationSettings
    from ditrt.diffusion.recording import record_calibration_inputs

    state.model = random_model(args.config).to(args.device)
    settings = CalibrationSettings() if not args.quick else CalibrationSettings(steps="50", timesteps=2, samples=2)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with torch.no_grad():
        batches = record_calibration_inputs(state.model, settings, device=args.device)
    _sync(args.device)
    t_record = time.perf_counter() - t0
    peak_record = torch.cuda.max_memory_allocated() if cuda else None
    t0 = time.perf_counter()
    state.recipe, state.tensors = calibrate(state.model, CalibrateConfig(method="ptq4dit", precision="w8a8", calibration=settings), batches,
                                            device=args.device)  # fmt: skip
    _sync(args.device)
    out = {"config": args.config, "settings": dataclasses.asdict(settings),
           "record_seconds": round(t_record, 2), "calibrate_seconds": round(time.perf_counter() - t0, 2),
           "layers": len(state.recipe.layers), "balanced_layers": len(state.recipe.balanced_layers)}  # fmt: skip
    if cuda:
        out.update(peak_gpu_mib_recording=round(peak_record / 2**20), peak_gpu_mib=round(torch.cuda.max_memory_allocated() / 2**20))
    return out


def sampling_part(args, state: State) -> dict:
    import numpy as np
    import torch

    from ditrt.diffusion.sample_set import generate
    from ditrt.diffusion.sampler import SamplerConfig
    from ditrt.models.quantized import quantized_model

    if state.recipe is None:
        raise RuntimeError("no recipe: the calibrate part failed")
    cfg = state.model.config
    num, steps = (32, "50") if not args.quick else (1, "50")
    sampler = SamplerConfig(steps=steps, cfg_scale=1.5)
    simulated = quantized_model(state.model.cpu(), state.recipe, state.tensors).to(args.device).eval()
    state.model.to(args.device)
    labels, seeds = [i % cfg.num_classes for i in range(num)], list(range(num))
    out = {"images": num, "steps": int(steps), "rows_per_call": 2 * num, "rounds": 2}
    models = {"float": state.model, "simulated_w8a8": simulated}
    with torch.no_grad():
        for denoiser in models.values():  # warm-up: kernels, allocator, thread pools
            x = torch.randn(2 * num, cfg.in_channels, cfg.input_size, cfg.input_size, device=args.device)
            denoiser(x, torch.full((2 * num,), 500.0, device=args.device), torch.zeros(2 * num, dtype=torch.long, device=args.device))
        for _ in range(out["rounds"]):  # alternated, best of the rounds: side by side under the same conditions
            for name, denoiser in models.items():
                _sync(args.device)
                t0 = time.perf_counter()
                data = generate(denoiser, sampler, labels, seeds, num_classes=cfg.num_classes,
                                image_shape=(cfg.in_channels, cfg.input_size, cfg.input_size), device=args.device, batch_size=num)  # fmt: skip
                _sync(args.device)
                ms = round(1000 * (time.perf_counter() - t0) / int(steps), 2)
                out[f"ms_per_step_{name}"] = min(ms, out.get(f"ms_per_step_{name}", ms))
                out[f"finite_{name}"] = bool(np.isfinite(data).all())
    out["simulated_over_float"] = round(out["ms_per_step_simulated_w8a8"] / out["ms_per_step_float"], 3)
    del simulated
    return out


def export_part(args, state: State) -> dict:
    import procstat  # bench/procstat.py

    from ditrt.export import check_onnx
    from ditrt.export.onnx_export import export_model

    if state.recipe is None:
        raise RuntimeError("no recipe: the calibrate part failed")
    model = state.model.cpu()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model-fp16.onnx"
        procstat.reset_peak()
        t0 = time.perf_counter()
        artifact = export_model(model, path, dtype="fp16", recipe=state.recipe, tensors=state.tensors)
        t_export = time.perf_counter() - t0
        peak = procstat.peak_rss_mib()
        violations = check_onnx(artifact)
        graph, data = procstat.onnx_file_bytes(artifact)
        return {"dtype": "fp16", "export_seconds": round(t_export, 2), "peak_rss_mib_export": round(peak), "graph_mib": round((graph + data) / 2**20),
                "check_violations": [f"{v.node}: [{v.rule}] {v.message}" for v in violations][:10]}  # fmt: skip


def distributed_part(args) -> dict:
    import numpy as np

    from ditrt.models.checkpoints import save_ditrt_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = save_ditrt_checkpoint(random_model("DiT-S/2"), tmp / "s2.safetensors")
        common = ["sample", str(ckpt), "--device", args.device, "--num-samples", "4", "--batch-size", "2", "--steps", "50"]
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        port = _free_port()
        runs = {
            "torchrun_1_rank": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master-port", str(port), "-m", "ditrt",
                                *common, "--out", str(tmp / "ddp")],
            "plain": [sys.executable, "-m", "ditrt", *common, "--out", str(tmp / "plain")],
        }  # fmt: skip
        out = {"backend": "nccl" if args.device.startswith("cuda") else "gloo"}
        for name, cmd in runs.items():
            t0 = time.perf_counter()
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
            out[f"{name}_seconds"] = round(time.perf_counter() - t0, 2)
            if r.returncode != 0:
                raise RuntimeError(f"{name} exited {r.returncode}: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
        a, b = np.load(tmp / "ddp" / "samples.npz"), np.load(tmp / "plain" / "samples.npz")
        key = "images" if "images" in a else "latents"
        out["bit_identical"] = bool(np.array_equal(a[key], b[key]) and np.array_equal(a["labels"], b["labels"]))
        if not out["bit_identical"]:
            raise RuntimeError("the torchrun run and the plain run differ")
        return out


def tensorrt_tests_part(args) -> dict:
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "tests/tensorrt"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = (r.stdout + r.stderr).strip().splitlines()
    skips = sorted({ln.split("] ", 1)[-1] for ln in lines if ln.startswith("SKIPPED")})
    return {"exit_code": r.returncode, "summary": lines[-1] if lines else "", "skip_reasons": skips[:10]}


def _sync(device: str) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="DiT-S/2 and tiny calibration settings (the CPU run here)")
    ap.add_argument("--config", default=None, help="model size [default: DiT-XL/2, DiT-S/2 with --quick]")
    ap.add_argument("--device", default=None, help="[default: cuda when torch sees a GPU, else cpu]")
    ap.add_argument("--out", type=Path, default=None, help="JSON file [default: bench/results/gpu_check-<device>.json]")
    args = ap.parse_args(argv)
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.config = args.config or ("DiT-S/2" if args.quick else "DiT-XL/2")
    if args.out is None:
        name = torch.cuda.get_device_name(0).replace(" ", "-") if args.device.startswith("cuda") else "cpu-quick" if args.quick else "cpu"
        args.out = ROOT / "bench" / "results" / f"gpu_check-{name}.json"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    check = Check(args.out, args)
    env = check.part("environment", lambda: environment(args))
    check.result["environment"] = {k: v for k, v in env.items() if k not in ("status", "seconds")}
    state = State()
    check.part("calibrate", lambda: calibrate_part(args, state))
    check.part("sampling", lambda: sampling_part(args, state))
    check.part("export", lambda: export_part(args, state))
    state.model = state.recipe = state.tensors = None
    check.part("distributed", lambda: distributed_part(args))
    check.part("tensorrt_tests", lambda: tensorrt_tests_part(args))
    failed = [n for n, p in check.result["parts"].items() if p["status"] == "failed"]
    check.result["failed"] = failed
    check.write()
    print(f"wrote {args.out}: " + ", ".join(f"{n} {p['status']}" for n, p in check.result["parts"].items()))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
