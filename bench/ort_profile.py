"""Where an ONNX Runtime denoiser step goes: the per-op-type breakdown of one step, fp32 vs W8A8 vs W4A16.

A benchmark, not a test (issue 15). For each graph (the float32 export and the W8A8 and W4A16 exports
of the same model, recipes from ``ditrt.calibrate.ptq.calibrate`` with small calibration settings) it
runs ONNX Runtime's profiler (``SessionOptions.enable_profiling``) over ``--calls`` denoiser steps
after ``--warmup`` untimed ones, and prints side by side, per kernel type ONNX Runtime ran (after its
graph fusions, so ``MatMulIntegerToFloat``, ``MatMulNBits``, ``SkipLayerNormalization`` ... appear as
they ran), the milliseconds per step, the share of the step and the kernel count per step. The step
times quoted for the ratios come from separate, unprofiled sessions timed in interleaved repeats
(repeat 1 of every graph, then repeat 2, ...), so load from other processes drifts onto every graph alike.

    .venv/bin/python bench/ort_profile.py                                        # built-in model, batch 32 (64 rows)
    .venv/bin/python bench/ort_profile.py --config DiT-XL/2 --depth 2 --batch 4  # DiT-XL/2 shapes, random weights
    .venv/bin/python bench/ort_profile.py --session-options                      # also threads 1/2 x ditrt's and ORT's session settings
    .venv/bin/python bench/ort_profile.py --isolate                              # also block 0's int8 Linears profiled alone

A step is one denoiser call at the guidance-doubled batch (2 x ``--batch`` rows), as the sampler
makes it. Results: ``bench/results/ort_profile/<name>.md`` and ``.json`` (the JSON also holds the
most expensive nodes of each graph by name).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import procstat
from backends import random_model, step_inputs

PRECISIONS = ("fp32", "w8a8", "w4a16")
#: Kernels that do the Linears' arithmetic, named in the summary line of each graph.
GEMMS = ("MatMulIntegerToFloat", "MatMulNBits", "QLinearMatMul", "MatMul", "FusedMatMul", "Gemm")


# ------------------------------------------------------------------------------------------- model
def load(args):
    """The model to profile: the built-in one or a checkpoint (``--depth``: its first blocks only), or
    a random DiT of a registered config (:func:`backends.random_model`)."""
    from ditrt.models.builtin import load_model

    if args.config is not None:
        return random_model(args.config, args.depth)
    model = load_model(args.model)
    if args.depth is not None:
        del model.blocks[args.depth :]
        model.config = dataclasses.replace(model.config, depth=len(model.blocks))
    return model.eval()


def export_graphs(model, args, work: Path) -> tuple[dict[str, Path], dict]:
    """precision -> exported graph; recipes calibrated on a short run (their values change accuracy, not speed)."""
    from ditrt.calibrate.ptq import CalibrateConfig, calibrate
    from ditrt.contracts.recipe import CalibrationSettings
    from ditrt.diffusion.recording import record_calibration_inputs
    from ditrt.export import check_onnx, export_onnx
    from ditrt.models.builtin import is_pixel_model

    info = {"check_onnx": {}, "prepare_s": {}}
    settings = CalibrationSettings(steps=args.calib_steps, timesteps=args.calib_timesteps, samples=args.calib_samples)
    t0 = time.perf_counter()
    batches = record_calibration_inputs(model, settings, pixel_space=is_pixel_model(model)) if len(args.precisions) > 1 else []
    paths = {}
    for p in args.precisions:
        recipe = tensors = None
        if p != "fp32":
            recipe, tensors = calibrate(model, CalibrateConfig(method=args.method, precision=p, calibration=settings, weights="rtn"), batches)
        paths[p] = export_onnx(model, work / f"{p}.onnx", recipe=recipe, tensors=tensors)
        info["check_onnx"][p] = [str(v) for v in check_onnx(paths[p])]
    info["prepare_s"] = time.perf_counter() - t0
    return paths, info


# ---------------------------------------------------------------------------------------- profiling
def feeds(model, batch: int) -> dict:
    x, t, y = step_inputs(model.config, batch, "cpu")
    return {"x": x.numpy(), "t": t.numpy(), "y": y.numpy()}


def profile_graph(path: Path, inputs: dict, args, work: Path) -> dict:
    """Per kernel type: ms per step, share of the step and kernels per step, from ONNX Runtime's
    trace of the last ``--calls`` of ``--warmup + --calls`` steps; plus the costliest nodes."""
    from ditrt.runtime.onnxruntime_backend import make_session

    session = make_session(path, threads=args.threads, profile_prefix=work / f"profile-{path.stem}")
    for _ in range(args.warmup + args.calls):
        session.run(None, inputs)
    trace = Path(session.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink(missing_ok=True)
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])[-args.calls :]
    windows = [(e["ts"], e["ts"] + e["dur"]) for e in runs]
    ms, count, nodes = defaultdict(float), defaultdict(int), defaultdict(float)
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        if not any(a <= e["ts"] <= b for a, b in windows):
            continue
        op = e["args"]["op_name"]
        ms[op] += e["dur"] / 1000 / len(runs)
        count[op] += 1
        nodes[f"{op} {e['name'].removesuffix('_kernel_time')}"] += e["dur"] / 1000 / len(runs)
    step = statistics.mean(e["dur"] / 1000 for e in runs)
    kernels = sum(ms.values())
    ops = {op: {"ms": v, "share": v / step, "per_step": count[op] // len(runs)} for op, v in sorted(ms.items(), key=lambda kv: -kv[1])}
    top = dict(sorted(nodes.items(), key=lambda kv: -kv[1])[: args.top_nodes])
    return {"profiled_step_ms": step, "kernel_ms": kernels, "outside_kernels_ms": step - kernels, "ops": ops, "top_nodes": top,
            "node_ms": dict(nodes)}  # fmt: skip


def isolated_linears(path: Path, profile: dict, rows: int, tokens: int, args, work: Path) -> list[dict]:
    """Block 0's quantized token Linears cut out of the W8A8 graph (its QuantizeLinear's input to the
    bias Add's output) and profiled alone on random input of their shape: the int8 kernel's ms alone
    against its ms inside the whole graph's step (issue 15 had seen them 11% slower inside)."""
    import numpy as np
    import onnx
    import onnx.utils

    graph = onnx.load(str(path), load_external_data=False).graph
    by_output = {o: n for n in graph.node for o in n.output}
    users = defaultdict(list)
    for n in graph.node:
        for i in n.input:
            users[i].append(n)
    found = []
    for n in graph.node:
        if n.op_type != "MatMul" or not n.name.startswith("blocks.0.") or n.input[0] not in by_output:
            continue
        dq = by_output[n.input[0]]
        q = by_output.get(dq.input[0]) if dq.op_type == "DequantizeLinear" else None
        if q is None or q.op_type != "QuantizeLinear":
            continue
        after = users[n.output[0]]
        end = after[0].output[0] if len(after) == 1 and after[0].op_type == "Add" else n.output[0]
        linear = n.name.rsplit("/", 1)[0]
        cut = work / f"isolated-{linear}.onnx"
        onnx.utils.extract_model(str(path), str(cut), [q.input[0]], [end])
        k, n_out = next(t for t in onnx.load(str(cut), load_external_data=False).graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2).dims
        x = np.random.default_rng(0).standard_normal((rows, tokens, k)).astype(np.float32)
        alone = {op: d["ms"] for op, d in profile_graph(cut, {q.input[0]: x}, args, work)["ops"].items()}
        inside = profile["node_ms"].get(f"MatMulIntegerToFloat {n.name}")
        found.append({"linear": linear, "shape": [rows * tokens, int(k), int(n_out)], "alone_ms": alone.get("MatMulIntegerToFloat"), "in_graph_ms": inside,
                      "alone_quantize_ms": alone.get("QuantizeLinear")})  # fmt: skip
    return found


def time_sessions(sessions: dict[str, object], inputs: dict, args) -> dict[str, list[float]]:
    """name -> ms per step of each repeat: ``--repeats`` interleaved repeats of ``--calls`` steps."""
    for s in sessions.values():
        for _ in range(args.warmup):
            s.run(None, inputs)
    times = {name: [] for name in sessions}
    for _ in range(args.repeats):
        for name, s in sessions.items():
            t0 = time.perf_counter()
            for _ in range(args.calls):
                s.run(None, inputs)
            times[name].append(1000 * (time.perf_counter() - t0) / args.calls)
    return times


def option_sets() -> dict[str, dict]:
    """Session variants measured by ``--session-options`` (make_session's keywords): ditrt's
    (:data:`DISABLED_OPTIMIZERS`, biases folded into the int8 kernels), ditrt's without the bias fold,
    ditrt's before issue 15, ditrt's with MatMulAddFusion back on, and ONNX Runtime's defaults."""
    from ditrt.runtime.onnxruntime_backend import DISABLED_OPTIMIZERS

    return {
        "ditrt": {"disabled_optimizers": DISABLED_OPTIMIZERS},
        "ditrt, bias not folded": {"disabled_optimizers": DISABLED_OPTIMIZERS, "fold_bias": False},
        "ditrt before issue 15": {"disabled_optimizers": ("MatMulAddFusion",), "fold_bias": False},
        "MatMulAddFusion on": {"disabled_optimizers": tuple(o for o in DISABLED_OPTIMIZERS if o != "MatMulAddFusion")},
        "ORT defaults": {"disabled_optimizers": (), "fold_bias": False},
    }


def describe(options: dict) -> str:
    """A session variant in words: its disabled optimizers and whether biases are folded."""
    disabled = ", ".join(options["disabled_optimizers"]) or "none"
    return f"disabled: {disabled}; bias {'folded' if options.get('fold_bias', True) else 'not folded'}"


def session_variants(paths: dict[str, Path], inputs: dict, args) -> dict:
    """Threads 1 and 2 x :func:`option_sets` for every graph: ms per step (interleaved), the Linear
    kernels each variant runs, or why ONNX Runtime refused to create the session."""
    from ditrt.runtime.onnxruntime_backend import make_session

    variants, kernels = {}, {}
    for p, path in paths.items():
        for threads in (1, 2):
            for name, options in option_sets().items():
                key = f"{p} | {threads} | {name}"
                try:
                    variants[key] = make_session(path, threads=threads, **options)
                    kernels[key] = linear_kernels(path, threads, options, args.work_dir)
                except Exception as e:  # noqa: BLE001  a variant ONNX Runtime refuses is a result too
                    variants[key] = f"refused: {str(e).strip().splitlines()[0][:160]}"
    live = {k: v for k, v in variants.items() if not isinstance(v, str)}
    times = time_sessions(live, inputs, args)
    return {k: ({"step_ms": times[k], "step_ms_median": statistics.median(times[k]), "kernels": kernels[k]} if k in times
                else {"error": v}) for k, v in variants.items()}  # fmt: skip


def linear_kernels(path: Path, threads: int, options: dict, work: Path) -> dict[str, int]:
    """Counts of the GEMM kernels (and of the Adds left beside them) in the graph as ONNX Runtime runs it with these options."""
    import onnx

    from ditrt.runtime.onnxruntime_backend import make_session

    out = work / f"{path.stem}.optimized.onnx"
    make_session(path, threads=threads, optimized_model_path=out, **options)
    ops = [n.op_type for n in onnx.load(str(out), load_external_data=False).graph.node]
    for f in (out, out.with_name(out.name + ".data")):
        f.unlink(missing_ok=True)
    return {k: ops.count(k) for k in (*GEMMS, "Add") if ops.count(k)}


# ---------------------------------------------------------------------------------------- reporting
def op_table(profiles: dict[str, dict]) -> str:
    names = list(profiles)
    ops = sorted({op for p in profiles.values() for op in p["ops"]}, key=lambda op: -max(p["ops"].get(op, {}).get("ms", 0) for p in profiles.values()))
    head = "| kernel | " + " | ".join(f"{n} ms (%) | {n} n" for n in names) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(names))]
    for op in ops:
        cells = []
        for n in names:
            d = profiles[n]["ops"].get(op)
            cells += [f"{d['ms']:.2f} ({100 * d['share']:.1f})", str(d["per_step"])] if d else ["-", "-"]
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    for label, key in (("all kernels", "kernel_ms"), ("outside kernels", "outside_kernels_ms"), ("profiled step", "profiled_step_ms")):
        lines.append(f"| **{label}** | " + " | ".join(f"{profiles[n][key]:.2f} | " for n in names) + " |")
    return "\n".join(lines)


def speed_lines(times: dict[str, list[float]], baseline: str = "fp32") -> list[str]:
    """Per graph: median ms per step and its spread, the speedup of medians, and the median of the
    speedups of each repeat (each repeat times every graph back to back, so a slow spell of the machine
    hits both sides of its ratio alike)."""
    med = {k: statistics.median(v) for k, v in times.items()}
    lines = []
    for k, v in times.items():
        paired = statistics.median(b / x for b, x in zip(times[baseline], v))
        lines.append(f"{k}: {med[k]:.2f} ms/step (repeats {min(v):.2f}-{max(v):.2f}), {med[baseline] / med[k]:.2f}x {baseline} "
                     f"(median of per-repeat ratios {paired:.2f}x, of fastest repeats {min(times[baseline]) / min(v):.2f}x)")  # fmt: skip
    return lines


def variant_table(variants: dict) -> str:
    sets = option_sets()
    lines = ["| graph | threads | session | ms/step | spread | GEMM kernels (and Adds) |", "|---|---|---|---|---|---|"]
    for k, v in variants.items():
        g, th, opt = k.split(" | ")
        what = f"{opt} ({describe(sets[opt])})"
        if "error" in v:
            lines.append(f"| {g} | {th} | {what} | {v['error']} | | |")
        else:
            kern = ", ".join(f"{n} {op}" for op, n in v["kernels"].items())
            lines.append(f"| {g} | {th} | {what} | {v['step_ms_median']:.2f} | {min(v['step_ms']):.2f}-{max(v['step_ms']):.2f} | {kern} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin", help="'builtin' or a checkpoint path")
    p.add_argument("--config", default=None, help="a registered config (e.g. DiT-XL/2) with random weights, instead of --model")
    p.add_argument("--depth", type=int, default=None, help="keep this many blocks (DiT-XL/2 shapes at a fraction of the cost)")
    p.add_argument("--batch", type=int, default=32, help="images per sampler call (each step runs 2x this with guidance)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads of ONNX Runtime")
    p.add_argument("--precisions", default=",".join(PRECISIONS), help="comma-separated; fp32 is the baseline and always included")
    p.add_argument("--method", default="minmax", choices=("minmax", "smoothquant", "ptq4dit"))
    p.add_argument("--calib-steps", default="10")
    p.add_argument("--calib-timesteps", type=int, default=2)
    p.add_argument("--calib-samples", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per session")
    p.add_argument("--calls", type=int, default=5, help="steps per profile and per timed repeat")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timed repeats (median reported)")
    p.add_argument("--top-nodes", type=int, default=25, help="costliest nodes kept in the JSON")
    p.add_argument("--isolate", action="store_true", help="also profile block 0's W8A8 Linears cut out of the graph, alone")
    p.add_argument("--session-options", action="store_true", help="also time threads 1 and 2 x the session variants (optimizer switches, bias fold)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "ort_profile")
    p.add_argument("--name", default=None, help="base name of the result files (default: from the model and batch)")
    p.add_argument("--work", type=Path, default=None, help="keep the graphs in this folder (default: a temporary one)")
    args = p.parse_args(argv)
    args.precisions = ["fp32"] + [q for q in args.precisions.split(",") if q and q != "fp32"]
    if bad := [q for q in args.precisions if q not in PRECISIONS]:
        p.error(f"unknown precision {bad[0]}; choose from {', '.join(PRECISIONS)}")
    if args.batch < 1 or args.calls < 1 or args.repeats < 1 or args.threads < 1 or args.warmup < 0:
        p.error("--batch, --calls, --repeats and --threads must be >= 1, --warmup >= 0")
    if args.config is not None and args.model != "builtin":
        p.error("give --model or --config, not both")
    if args.name is None:
        what = args.config.replace("/", "") if args.config else Path(args.model).stem
        args.name = f"{what}{f'-depth{args.depth}' if args.depth else ''}-b{args.batch}-t{args.threads}"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import onnxruntime
    import torch

    from ditrt import __version__
    from ditrt.runtime.onnxruntime_backend import make_session

    torch.set_num_threads(args.threads)
    onnxruntime.set_default_logger_severity(3)
    load_avg = os.getloadavg()[0]
    model = load(args)
    inputs = feeds(model, args.batch)
    work = Path(tempfile.mkdtemp(prefix="ditrt-ort-profile-")) if args.work is None else args.work
    work.mkdir(parents=True, exist_ok=True)
    args.work_dir = work
    try:
        print(f"calibrating ({args.method}) and exporting {', '.join(args.precisions)} in {work} ...", flush=True)
        paths, info = export_graphs(model, args, work)
        print(f"profiling {args.warmup} + {args.calls} steps per graph ...", flush=True)
        profiles = {p: profile_graph(path, inputs, args, work) for p, path in paths.items()}
        print(f"timing {args.repeats} x {args.calls} steps per graph (interleaved) ...", flush=True)
        times = time_sessions({p: make_session(path, threads=args.threads) for p, path in paths.items()}, inputs, args)
        variants = session_variants(paths, inputs, args) if args.session_options else None
        isolated = None
        if args.isolate and "w8a8" in paths:
            print("profiling block 0's int8 Linears alone ...", flush=True)
            isolated = isolated_linears(paths["w8a8"], profiles["w8a8"], 2 * args.batch, model.config.num_tokens, args, work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    cfg = model.config
    meta = {
        "model": args.config or str(args.model), "model_config": cfg.to_dict(), "params": sum(p.numel() for p in model.parameters()),
        "rows_per_step": 2 * args.batch, "tokens": cfg.num_tokens, "args": {k: str(v) for k, v in vars(args).items() if k != "work_dir"},
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "load_average_at_start": load_avg,
        "onnxruntime": onnxruntime.__version__, "torch": torch.__version__, "ditrt": __version__, **info,
    }  # fmt: skip
    speed = {p: {"step_ms": v, "step_ms_median": statistics.median(v)} for p, v in times.items()}
    for p in speed:
        speed[p]["speedup_vs_fp32"] = speed["fp32"]["step_ms_median"] / speed[p]["step_ms_median"]
        speed[p]["speedup_vs_fp32_paired"] = statistics.median(b / x for b, x in zip(times["fp32"], times[p]))
    gemm = {p: ", ".join(f"{d['per_step']} {op}" for op, d in profiles[p]["ops"].items() if op in GEMMS) for p in profiles}
    text = "\n".join([
        f"Model {meta['model']} (hidden {cfg.hidden_size}, depth {cfg.depth}, {cfg.num_tokens} tokens, {meta['params'] / 1e6:.1f} M parameters); "
        f"one step = {2 * args.batch} rows (batch {args.batch} with guidance); {args.threads} thread(s); ONNX Runtime {onnxruntime.__version__}.",
        "",
        "Step time, unprofiled sessions, interleaved repeats (median):",
        *[f"- {line}" for line in speed_lines(times)],
        "",
        f"Per kernel type ONNX Runtime ran (profiler, mean of {args.calls} steps after {args.warmup} warm-up): ms per step (% of the profiled step), kernels per step.",
        "",
        op_table(profiles),
        "",
        *[f"- {p} GEMM kernels: {gemm[p]}" for p in profiles],
        f"- check_onnx: {'all graphs pass' if not any(info['check_onnx'].values()) else info['check_onnx']}",
        f"- recipes: {args.method} (weights rtn), calibrated on {args.calib_timesteps} steps x {args.calib_samples} samples of a "
        f"{args.calib_steps}-step run; 1-minute load average {load_avg:.2f} at start ({meta['machine']}).",
    ])  # fmt: skip
    if variants is not None:
        text += "\n\nSession options (interleaved, ms per step):\n\n" + variant_table(variants)
    if isolated:
        text += ("\n\nBlock 0's W8A8 Linears cut out of the graph and profiled alone (MatMulIntegerToFloat ms per run):\n\n"
                 "| Linear | GEMM (M x K x N) | alone | inside the graph's step |\n|---|---|---|---|\n")
        text += "\n".join(f"| {d['linear']} | {' x '.join(map(str, d['shape']))} | {d['alone_ms']:.3f} | {d['in_graph_ms']:.3f} |" for d in isolated)
    text += "\n"
    procstat.write_results(args.out, args.name, {"meta": meta, "speed": speed, "profiles": profiles, "session_variants": variants, "isolated_linears": isolated},
                           f"ONNX Runtime profile: {meta['model']}, batch {args.batch}", text)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
