"""Backends side by side: torch, ONNX Runtime and TensorRT at float and quantized precisions.

A benchmark, not a test (issue 5, item 7; issue 4's "w8a8 faster than fp32 on this CPU"). Per
backend and precision: ms per denoising step, images per second for a full sampling run, peak
memory and the ONNX/engine file size, each with its ratio against the float row of the same group
measured in the same run.

    .venv/bin/python bench/backends.py                                  # the built-in model
    .venv/bin/python bench/backends.py --model CKPT --batch 8 --steps 50 --repeats 3
    .venv/bin/python bench/backends.py --config DiT-XL/2 --depth 2 --batch 4 --steps 5   # DiT-XL/2 shapes, random weights

Rows. CPU group (baseline: ONNX Runtime fp32): torch fp32 (the float model), ONNX Runtime on the
float32 graph, on the W8A8 graph and on the W4A16 graph (float32 graphs: float16 has no fast CPU
kernels). GPU group, only when ``tensorrt_available()`` (baseline: TensorRT fp16): torch fp16 on
CUDA, and TensorRT engines built with ``engine_from_onnx`` from float16 exports (fp16, W8A8,
W4A16). Without TensorRT and a GPU one line says that the TensorRT rows were skipped, and why.
Recipes come from ``ditrt.calibrate.ptq.calibrate`` with small calibration settings (``--method``);
the recipe changes accuracy, not speed.

How it measures:
- A *step* is one denoiser call at the guidance-doubled batch (2 x ``--batch`` rows: conditional
  half, null-class half), as the sampler makes it. Each row gets ``--warmup`` untimed calls, then
  ``--repeats`` timed repeats of ``--calls`` calls each; the table gives the median ms per call
  (and the spread). Repeats are interleaved across rows (repeat 1 of every row, then repeat 2, ...)
  so that load from other processes on this shared machine drifts onto every row alike.
- Images per second: ``--batch`` images sampled with the full DDPM loop at ``--steps`` steps and
  cfg ``--cfg-scale``, median wall time over ``--repeats`` (interleaved too), after one untimed run.
- Peak memory: each row is loaded in its own child process that imports everything first, then
  creates the denoiser and runs ``--warmup + --calls`` steps; it reports its peak RSS and the part
  the backend added over the imports (and, on CUDA, the device memory it took).
- Sanity: the relative L2 error of each row's output at the timed inputs against torch float32, and
  the paired PSNR of its samples against torch float32's (same seeds), so a fast but broken graph
  shows. ONNX Runtime rows also list the fused kernels ONNX Runtime actually runs
  (``MatMulIntegerToFloat`` for int8, ``MatMulNBits`` for int4).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import procstat

MIB = procstat.MIB
QUANTIZED = ("w8a8", "w4a16")
#: ONNX Runtime kernels worth naming: what the Linears of each graph ran as.
KERNELS = ("MatMulIntegerToFloat", "MatMulNBits", "QLinearMatMul", "DynamicQuantizeLinear", "MatMul", "FusedMatMul", "Gemm")


@dataclass
class Row:
    name: str
    backend: str  # torch | onnxruntime | tensorrt
    precision: str  # fp32 | fp16 | w8a8 | w4a16
    group: str  # cpu | gpu: ratios are taken against the group's float baseline
    device: str = "cpu"
    artifact: str | None = None  # the ONNX (onnxruntime) or engine (tensorrt) file
    onnx: str | None = None  # tensorrt: the ONNX the engine was built from


BASELINES = {"cpu": "onnxruntime fp32", "gpu": "tensorrt fp16"}


# ----------------------------------------------------------------------------------- denoisers
def random_model(config: str, depth: int | None = None):
    """A DiT of a registered config (``depth`` blocks, None: all) with every weight drawn from
    N(0, 0.02), so that no layer is trivially zero (adaLN-Zero): a real model's shapes (DiT-XL/2)
    for timing, without its checkpoint."""
    import dataclasses

    import torch

    from ditrt.contracts.model_config import CONFIGS
    from ditrt.models.dit import build_model

    cfg = CONFIGS[config]
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(cfg, depth=depth) if depth is not None else cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    return model.eval()


def make_denoiser(row: Row, args):
    """The row's denoiser, opened like every ditrt command opens an artifact (ditrt.runtime.open)."""
    import torch

    from ditrt.runtime.open import open_denoiser

    if row.backend == "torch":
        dtype = torch.float16 if row.precision == "fp16" else torch.float32
        return open_denoiser(args.model, device=row.device, dtype=dtype).denoiser
    if row.backend == "onnxruntime":
        return open_denoiser(row.artifact, threads=args.threads).denoiser
    return open_denoiser(Path(row.artifact), onnx=Path(row.onnx) if row.onnx else None, device="cuda", use_cuda_graph=args.cuda_graph).denoiser


def step_inputs(config, batch: int, device: str, seed: int = 0):
    """One guided call: x (2B, C, H, W) and t (2B,) (each image twice), y (2B,) labels then the null class."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, config.input_size, config.input_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g).float()
    y = torch.randint(0, config.num_classes, (batch,), generator=g)
    null = torch.full_like(y, config.num_classes)
    return torch.cat([x, x]).to(device), torch.cat([t, t]).to(device), torch.cat([y, null]).to(device)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def time_calls(denoiser, inputs, calls: int, device: str) -> float:
    """Mean ms per call over ``calls`` back-to-back calls (0.0 for none: a warm-up of 0 calls)."""
    if calls == 0:
        return 0.0
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        denoiser(*inputs)
    _sync(device)
    return 1000 * (time.perf_counter() - t0) / calls


def run_sampling(denoiser, row: Row, args, config, pixel: bool):
    """(seconds, samples) of one full sampling run of ``--batch`` images."""
    from ditrt.diffusion.sampler import SamplerConfig, sample

    labels = [i % config.num_classes for i in range(args.batch)]
    seeds = list(range(args.batch))
    sampler = SamplerConfig(steps=args.steps, cfg_scale=args.cfg_scale, clip_denoised=pixel)
    shape = (config.in_channels, config.input_size, config.input_size)
    _sync(row.device)
    t0 = time.perf_counter()
    x = sample(denoiser, sampler, labels, seeds, num_classes=config.num_classes, image_shape=shape, device=row.device)
    _sync(row.device)
    return time.perf_counter() - t0, x.float().cpu()


# ------------------------------------------------------------------------------------ artifacts
def prepare(args, model, work: Path, trt_ok: bool) -> tuple[list[Row], dict]:
    """Recipes, exports (+ check_onnx) and engines; the rows to measure and what it took."""
    from ditrt.calibrate.ptq import CalibrateConfig, calibrate
    from ditrt.contracts.recipe import CalibrationSettings
    from ditrt.diffusion.recording import record_calibration_inputs
    from ditrt.export import check_onnx, export_onnx
    from ditrt.models.builtin import is_pixel_model

    info = {"check_onnx": {}, "prepare_s": {}}
    t0 = time.perf_counter()
    settings = CalibrationSettings(steps=args.calib_steps, timesteps=args.calib_timesteps, samples=args.calib_samples)
    batches = record_calibration_inputs(model, settings, pixel_space=is_pixel_model(model))
    recipes = {
        p: calibrate(model, CalibrateConfig(method=args.method, precision=p, calibration=settings), batches) for p in QUANTIZED
    }
    info["prepare_s"]["calibrate"] = time.perf_counter() - t0

    def export(precision: str, dtype: str) -> str:
        recipe, tensors = recipes.get(precision, (None, None))
        path = work / f"{precision}-{dtype}.onnx"
        t0 = time.perf_counter()
        export_onnx(model, path, dtype=dtype, recipe=recipe, tensors=tensors)
        info["prepare_s"][f"export {precision} {dtype}"] = time.perf_counter() - t0
        info["check_onnx"][path.name] = [str(v) for v in check_onnx(path)]
        return str(path)

    rows = [Row("torch fp32", "torch", "fp32", "cpu")]
    rows += [Row(f"onnxruntime {p}", "onnxruntime", p, "cpu", artifact=export(p, "fp32")) for p in ("fp32", *QUANTIZED)]
    if trt_ok:
        from ditrt.contracts.profile import BuildConfig
        from ditrt.engines import engine_from_onnx

        rows.append(Row("torch fp16 (cuda)", "torch", "fp16", "gpu", device="cuda"))
        build = BuildConfig(batch_min=1, batch_opt=args.batch, batch_max=args.batch)  # engine batch 2 x --batch
        for p in ("fp16", *QUANTIZED):
            onnx = export(p, "fp16")
            t0 = time.perf_counter()
            try:
                plan = engine_from_onnx(Path(onnx), work / f"{p}-fp16.plan", build)
            except Exception as e:  # noqa: BLE001  one failed build leaves the other rows to measure
                info.setdefault("skipped", {})[f"tensorrt {p}"] = f"{type(e).__name__}: {e}"
                print(f"tensorrt {p} skipped: the engine build failed ({type(e).__name__}: {e})", flush=True)
                continue
            info["prepare_s"][f"build {p}"] = time.perf_counter() - t0
            rows.append(Row(f"tensorrt {p}", "tensorrt", p, "gpu", device="cuda", artifact=str(plan), onnx=onnx))
    return rows, info


def ort_kernels(path: str, threads: int | None, work: Path) -> dict[str, int]:
    """Counts of the Linear kernels in the graph as ONNX Runtime optimised it (same session options)."""
    import onnx
    import onnxruntime

    from ditrt.runtime.onnxruntime_backend import make_session

    onnxruntime.set_default_logger_severity(3)  # saving an optimised graph warns that it is hardware specific
    out = work / (Path(path).stem + ".ort-optimized.onnx")
    make_session(path, threads=threads, optimized_model_path=out)
    ops = Counter(n.op_type for n in onnx.load(str(out), load_external_data=False).graph.node)
    out.unlink(missing_ok=True)
    return {k: ops[k] for k in KERNELS if ops[k]}


def artifact_bytes(row: Row) -> int | None:
    if row.artifact is None:
        return None
    if row.backend == "onnxruntime":
        return sum(procstat.onnx_file_bytes(Path(row.artifact)))
    return Path(row.artifact).stat().st_size


# --------------------------------------------------------------------------------- memory child
def memory_child(args) -> dict:
    """In a fresh process: import everything, then load one row and run a few steps."""
    import onnxruntime  # noqa: F401  imported before the baseline, as every backend module is
    import torch

    import ditrt.runtime.onnxruntime_backend
    import ditrt.runtime.open
    import ditrt.runtime.torch_backend
    from ditrt.contracts.model_config import DiTConfig
    from ditrt.models.builtin import load_model  # noqa: F401
    from ditrt.models.checkpoints import load_dit  # noqa: F401

    row = Row(**json.loads(args.row))
    config = DiTConfig.from_dict(json.loads(args.model_config))
    torch.set_num_threads(args.threads)
    cuda = row.device.startswith("cuda")
    if row.backend == "tensorrt":
        import ditrt.runtime.tensorrt_backend  # noqa: F401  TensorRT's libraries belong to the baseline too
        from ditrt.engines.build import import_tensorrt

        import_tensorrt(builder=False)
    if cuda:
        torch.zeros(1, device="cuda")  # the CUDA context belongs to the baseline
        torch.cuda.synchronize()
        free_before = torch.cuda.mem_get_info()[0]
    rss_imports = procstat.rss_mib()
    procstat.reset_peak()
    denoiser = make_denoiser(row, args)
    inputs = step_inputs(config, args.batch, row.device)
    time_calls(denoiser, inputs, args.warmup + args.calls, row.device)
    result = {"rss_imports_mib": rss_imports, "peak_rss_mib": procstat.peak_rss_mib()}
    result["backend_rss_mib"] = result["peak_rss_mib"] - rss_imports
    if cuda:
        result["gpu_mib"] = (free_before - torch.cuda.mem_get_info()[0]) / MIB
    return result


def measure_memory(row: Row, args, config, work: Path) -> dict:
    result = work / f"memory-{row.name.replace(' ', '_').replace('(', '').replace(')', '')}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-memory", "--row", json.dumps(asdict(row)), "--result", str(result),
           "--model-config", json.dumps(config.to_dict()), "--model", str(args.model), "--batch", str(args.batch), "--warmup", str(args.warmup), "--calls", str(args.calls),
           "--threads", str(args.threads)] + (["--cuda-graph"] if args.cuda_graph else [])  # fmt: skip
    proc = subprocess.run(cmd, check=False)
    if proc.returncode != 0 or not result.exists():
        return {"error": f"memory child exited with {proc.returncode}"}
    return json.loads(result.read_text())


# ---------------------------------------------------------------------------------------- speed
def measure_speed(rows: list[Row], args, model) -> dict[str, dict]:
    """Step and sampling times (interleaved repeats), outputs and samples for the sanity columns."""
    from ditrt.models.builtin import is_pixel_model
    from ditrt.quality.metrics import paired_psnr, relative_error

    config, pixel = model.config, is_pixel_model(model)
    denoisers = {r.name: make_denoiser(r, args) for r in rows}
    inputs = {d: step_inputs(config, args.batch, d) for d in {r.device for r in rows}}
    res = {r.name: {"step_ms": [], "sample_s": []} for r in rows}
    for r in rows:  # warm-up: first-call allocations, ONNX Runtime's lazy init, CUDA graph capture
        time_calls(denoisers[r.name], inputs[r.device], args.warmup, r.device)
    print(f"timing {args.repeats} x {args.calls} steps per row (interleaved) ...", flush=True)
    for _ in range(args.repeats):
        for r in rows:
            res[r.name]["step_ms"].append(time_calls(denoisers[r.name], inputs[r.device], args.calls, r.device))
    outputs = {r.name: denoisers[r.name](*inputs[r.device]).float().cpu().clone() for r in rows}
    print(f"sampling {args.batch} images x {args.steps} steps, {args.repeats} times per row (interleaved) ...", flush=True)
    samples = {r.name: run_sampling(denoisers[r.name], r, args, config, pixel)[1] for r in rows}  # untimed warm-up run
    for _ in range(args.repeats):
        for r in rows:
            res[r.name]["sample_s"].append(run_sampling(denoisers[r.name], r, args, config, pixel)[0])
    ref = "torch fp32"
    for r in rows:
        res[r.name]["rel_error_vs_torch_fp32"] = relative_error(outputs[ref], outputs[r.name])
        res[r.name]["psnr_db_vs_torch_fp32"] = paired_psnr(samples[ref].numpy(), samples[r.name].numpy())
    for d in denoisers.values():
        getattr(d, "close", lambda: None)()
    return res


# ------------------------------------------------------------------------------------ reporting
def summarise(rows: list[Row], speed: dict, memory: dict, sizes: dict, kernels: dict, args) -> list[dict]:
    out = []
    for r in rows:
        s = speed[r.name]
        d = {**asdict(r), **{k: v for k, v in s.items()}, "memory": memory[r.name], "file_bytes": sizes[r.name],
             "kernels": kernels.get(r.name, {})}  # fmt: skip
        d["step_ms_median"] = statistics.median(s["step_ms"])
        d["sample_s_median"] = statistics.median(s["sample_s"])
        d["images_per_s"] = args.batch / d["sample_s_median"]
        out.append(d)
    by_name = {d["name"]: d for d in out}
    for d in out:
        base = by_name.get(BASELINES[d["group"]])
        if base is None:
            continue
        d["baseline"] = base["name"]
        d["step_speedup"] = base["step_ms_median"] / d["step_ms_median"]
        d["images_per_s_ratio"] = d["images_per_s"] / base["images_per_s"]
        mine, theirs = d["memory"].get("backend_rss_mib"), base["memory"].get("backend_rss_mib")
        d["backend_rss_ratio"] = mine / theirs if mine and theirs else None
        d["file_ratio"] = d["file_bytes"] / base["file_bytes"] if d["file_bytes"] and base["file_bytes"] else None
    return out


def _f(v, fmt: str, none: str = "-") -> str:
    return none if v is None else format(v, fmt)


def _ratio(d: dict, key: str) -> str:
    return f" ({d[key]:.2f}x)" if d.get(key) is not None else ""


def table(rows: list[dict]) -> str:
    head = ("| backend | ms/step | spread | step speedup | img/s | img/s ratio | peak RSS MiB | backend RSS MiB (ratio) | GPU MiB "
            "| file MiB (ratio) | Linear kernels (ONNX Runtime) | rel. err vs torch fp32 | PSNR dB vs torch fp32 |")  # fmt: skip
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for d in rows:
        m = d["memory"]
        spread = f"{min(d['step_ms']):.2f}-{max(d['step_ms']):.2f}"
        kern = ", ".join(f"{n} {k}" for k, n in d["kernels"].items()) or "-"
        lines.append(
            f"| {d['name']} | {d['step_ms_median']:.2f} | {spread} | {_f(d.get('step_speedup'), '.2f')}x | "
            f"{d['images_per_s']:.2f} | {_f(d.get('images_per_s_ratio'), '.2f')}x | {_f(m.get('peak_rss_mib'), ',.0f')} | "
            f"{_f(m.get('backend_rss_mib'), ',.0f')}{_ratio(d, 'backend_rss_ratio')} | {_f(m.get('gpu_mib'), ',.0f')} | "
            f"{_f(d['file_bytes'] and d['file_bytes'] / MIB, ',.2f')}{_ratio(d, 'file_ratio')} | {kern} | "
            f"{d['rel_error_vs_torch_fp32']:.2e} | {d['psnr_db_vs_torch_fp32']:.1f} |"
        )
    return "\n".join(lines)


def notes(rows: list[dict], meta: dict, args) -> list[str]:
    n = [
        (
            f"Model {meta['model']} ({meta['params'] / 1e6:.2f} M parameters, {meta['tokens']} tokens); a step is one denoiser call at "
            f"{2 * args.batch} rows (--batch {args.batch} images, doubled for guidance); img/s: {args.batch} images sampled at "
            f"{args.steps} steps, cfg {args.cfg_scale}."
        ),
        (
            f"Medians of {args.repeats} interleaved repeats ({args.calls} calls each for ms/step) after {args.warmup} warm-up calls; "
            "spread = min-max of the repeats."
        ),
        "Ratios are against the float baseline of the group measured in this run: "
        + "; ".join(f"{g}: {b}" for g, b in BASELINES.items())
        + ". step speedup = baseline ms / ms (>1 is faster).",
        (
            "Memory: each row loaded in its own child process after importing torch, ONNX Runtime and ditrt; peak RSS is that "
            "child's, 'backend RSS' what loading the row and running steps added over the imports."
        ),
        "Files: torch = the checkpoint, ONNX Runtime = the float32 ONNX graph, TensorRT = the engine (from a float16 graph).",
        (
            f"Recipes: {args.method}, calibrated on {args.calib_timesteps} steps x {args.calib_samples} samples of a "
            f"{args.calib_steps}-step run."
        ),
        (
            f"Machine: {meta['machine']}; {args.threads} threads for torch and ONNX Runtime; torch {meta['torch']}, "
            f"onnxruntime {meta['onnxruntime']}, ditrt {meta['ditrt']}; 1-minute load average {meta['load_average_at_start']:.2f} "
            "before the run. Compare rows of one run, not runs."
        ),
        meta["tensorrt"],
    ]
    bad = {k: v for k, v in meta["check_onnx"].items() if v}
    n.append("check_onnx: " + ("all graphs pass" if not bad else "; ".join(f"{k}: {v[0]}" for k, v in bad.items())))
    return n


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin", help="'builtin' or a checkpoint path")
    p.add_argument("--config", default=None, help="a registered config (e.g. DiT-XL/2) with random weights, instead of --model")
    p.add_argument("--depth", type=int, default=None, help="with --config: keep this many blocks")
    p.add_argument("--batch", type=int, default=16, help="images per sampler call (each step runs 2x this with guidance)")
    p.add_argument("--steps", default="50", help="sampling schedule of the images/s runs ('250', '50', 'ddim25', ...)")
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--repeats", type=int, default=7, help="timed repeats per row (median reported)")
    p.add_argument("--calls", type=int, default=20, help="denoiser calls per timed repeat of ms/step")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls per row before timing")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="intra-op threads of torch and ONNX Runtime")
    p.add_argument(
        "--method", default="ptq4dit", choices=("minmax", "smoothquant", "ptq4dit"), help="calibration method of the recipes"
    )
    p.add_argument("--calib-steps", default="50", help="sampling schedule the calibration inputs are recorded from")
    p.add_argument("--calib-timesteps", type=int, default=5)
    p.add_argument("--calib-samples", type=int, default=8)
    p.add_argument("--cuda-graph", action="store_true", help="TensorRT rows replay a CUDA graph per batch size")
    p.add_argument("--no-tensorrt", action="store_true", help="skip the TensorRT rows even where TensorRT is available")
    p.add_argument("--out", type=Path, default=HERE / "results", help="folder for <name>.json and <name>.md")
    p.add_argument("--name", default="backends", help="base name of the result files")
    p.add_argument("--work", type=Path, default=None, help="folder for the ONNX graphs and engines (default: temporary)")
    p.add_argument("--keep", action="store_true", help="keep the ONNX graphs and engines")
    p.add_argument("--child-memory", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--row", help=argparse.SUPPRESS)
    p.add_argument("--model-config", help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.batch < 1 or args.repeats < 1 or args.calls < 1 or args.warmup < 0 or args.threads < 1:
        p.error("--batch, --repeats, --calls and --threads must be >= 1, --warmup >= 0")
    if args.config is not None and args.model != "builtin":
        p.error("give --model or --config, not both")
    if args.depth is not None and (args.config is None or args.depth < 1):
        p.error("--depth needs --config and must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child_memory:
        args.result.write_text(json.dumps(memory_child(args)))
        return 0
    import onnxruntime
    import torch

    from ditrt import __version__
    from ditrt.engines import tensorrt_available
    from ditrt.models.builtin import BUILTIN_DIT, BUILTIN_NAME, load_model

    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"warning: load average {load:.1f} on {os.cpu_count()} CPUs before starting: other processes compete for the cores, "
              "so timings are noisier; give --threads no more than the idle cores (torch's OpenMP threads slow down many "
              "times over when they share a core with another busy process)", flush=True)  # fmt: skip
    own_work = args.work is None
    work = Path(tempfile.mkdtemp(prefix="ditrt-bench-backends-")) if own_work else args.work
    work.mkdir(parents=True, exist_ok=True)
    if args.config is not None:  # every row (and each memory child) loads it as a checkpoint
        from ditrt.models.checkpoints import save_ditrt_checkpoint

        depth = f"-depth{args.depth}" if args.depth else ""
        args.model = str(save_ditrt_checkpoint(random_model(args.config, args.depth), work / f"random-{args.config.replace('/', '')}{depth}.safetensors"))
    model = load_model(args.model).eval()
    trt_ok, trt_why = tensorrt_available()
    if args.no_tensorrt:
        trt_ok, trt_why = False, "--no-tensorrt was given"
    trt_line = f"TensorRT rows: {trt_why}" if trt_ok else f"TensorRT rows skipped: {trt_why}"
    print(trt_line, flush=True)
    try:
        print(f"calibrating ({args.method}), exporting{' and building engines' if trt_ok else ''} in {work} ...", flush=True)
        rows, info = prepare(args, model, work, trt_ok)
        ckpt = BUILTIN_DIT if str(args.model) == BUILTIN_NAME else Path(args.model)
        sizes = {r.name: ckpt.stat().st_size if r.backend == "torch" else artifact_bytes(r) for r in rows}
        info["onnx_bytes"] = {r.name: sum(procstat.onnx_file_bytes(Path(r.onnx))) for r in rows if r.onnx}
        kernels = {r.name: ort_kernels(r.artifact, args.threads, work) for r in rows if r.backend == "onnxruntime"}
        memory = {}
        for r in rows:
            print(f"memory: {r.name} in a child process ...", flush=True)
            memory[r.name] = measure_memory(r, args, model.config, work)
        speed = measure_speed(rows, args, model)
    finally:
        if own_work and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    meta = {
        "model": f"{args.config} random weights, depth {model.config.depth}" if args.config else str(args.model), "params": sum(p.numel() for p in model.parameters()), "tokens": model.config.num_tokens,
        "model_config": model.config.to_dict(), "args": {k: str(v) for k, v in vars(args).items() if v is not None},
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "load_average_at_start": load, "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__, "ditrt": __version__, "tensorrt": trt_line, "tensorrt_available": trt_ok,
        **info,
    }  # fmt: skip
    results = summarise(rows, speed, memory, sizes, kernels, args)
    text = table(results) + "\n\n" + "\n".join(f"- {n}" for n in notes(results, meta, args)) + "\n"
    procstat.write_results(args.out, args.name, {"meta": meta, "rows": results}, f"Backends side by side: {meta['model']}", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
