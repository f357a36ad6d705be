"""Export at scale: a randomly initialised DiT-XL/2 to ONNX as float, W8A8 and W4A16, on this machine.

A benchmark, not a test (issue 4, item 6). For each precision it records the wall time of
``export_onnx``, peak resident memory, the file size (graph + external data), the bytes of the
quantized Linear weights in the file against their float16 size, and what ``check_onnx`` says.

    .venv/bin/python bench/export_scale.py                         # DiT-XL/2, float16 graphs, and the CLI cases
    .venv/bin/python bench/export_scale.py --config DiT-S/2        # a quick run
    .venv/bin/python bench/export_scale.py --precisions "" --cli w8a8:fp16   # one CLI case only

How it measures:
- Each export runs in its own child process (this script re-run with ``--child``), so memory is
  returned to the system between exports and every peak is that export's alone. The child builds
  the same random model (same seed, so the same ``state_dict_hash``), randomises every all-zero
  parameter (adaLN-Zero outputs, final layer, biases) so no tensor is degenerate, and makes a
  recipe directly from simple scales: weights ``weight_scale(search="minmax")`` (per output channel
  INT8, or INT4 blocks of ``--block-size``), activations (W8A8) absmax/127 of each quantized
  Linear's input over one forward pass of a small batch, recorded by hooks. No sampler calibration:
  the recipe's quality is not what is measured. The recipe holds only ``quant.*`` scales (no
  balancing, so no folded ``model.*`` weights), and the model stays float32, as
  ``ditrt export --model CKPT --recipe DIR`` would hold it.
- Memory: ``VmRSS`` just before ``export_onnx`` (model + recipe), the peak during ``export_onnx``
  alone (``VmHWM`` after resetting it through ``/proc/self/clear_refs``), the peak during
  ``check_onnx``, and the child's whole-life peak (the maximum over those phases and the setup
  before them; resetting ``VmHWM`` also resets ``ru_maxrss``/``RUSAGE_CHILDREN``, so those are not
  read).
- Quantized Linear bytes: the sizes of the ``<layer>.weight_quantized`` (and ``.weight_scale``)
  initializers as stored, against 2 bytes per weight (their float16 size; also read from the float
  graph's initializers when the float export is in the run).
- The CLI cases (``--cli precision:dtype,...``): the model as ``ditrt export --model CKPT --recipe DIR``
  holds it. A child writes the same random model as a ditrt checkpoint and each recipe as a recipe
  folder the way ``ditrt calibrate`` writes one (its ``model.*`` state dict, a full float32 copy of
  the weights, beside the ``quant.*`` scales); then the real command runs in its own process
  (``python -m ditrt export ... --json``: load recipe and checkpoint, export, check_onnx) and its
  whole-life peak RSS is read from ``os.wait4`` (``ru_maxrss`` of that one child).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import procstat

PRECISIONS = ("float", "w8a8", "w4a16")
MIB = procstat.MIB


# ------------------------------------------------------------------------------------ the model
def random_model(config: str, seed: int):
    """``build_model(config)`` with every all-zero parameter refilled from N(0, 0.02^2)."""
    import torch

    from ditrt.models.dit import build_model

    torch.manual_seed(seed)
    model = build_model(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():  # adaLN-Zero modulation and final layer, zeroed biases
                p.normal_(0.0, 0.02)
    return model


def input_absmax(model, layers: list[str], batch: int, seed: int) -> dict[str, float]:
    """max |input| of each named Linear over one forward pass of ``batch`` random valid inputs."""
    import torch

    from ditrt.contracts.spec import DiTSpec

    seen = {name: 0.0 for name in layers}

    def hook_for(name):
        def hook(_module, inputs):
            seen[name] = max(seen[name], float(inputs[0].detach().abs().max()))

        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in layers]
    try:
        with torch.no_grad():
            model(*DiTSpec.of(model).sample_inputs(batch, seed=seed))
    finally:
        for h in handles:
            h.remove()
    return seen


def simple_recipe(model, precision: str, *, block_size: int, act_batch: int, seed: int):
    """(Recipe, tensors) from min-max weight scales and one-batch absmax input scales."""
    import torch

    from ditrt.calibrate.ptq import quantized_layers
    from ditrt.calibrate.scale_search import activation_scale, weight_scale
    from ditrt.contracts.files import state_dict_hash
    from ditrt.contracts.precisions import get_precision
    from ditrt.contracts.recipe import CalibrationSettings, Recipe

    p = get_precision(precision)
    w_bits, a_bits, granularity = p.weight_bits, p.act_bits, p.weight_granularity
    layers = quantized_layers(model)
    block = block_size if granularity == "block" else None
    tensors = {}
    for name in layers:
        w = model.get_submodule(name).weight.detach()
        tensors[f"quant.{name}.weight_scale"] = weight_scale(
            w, w_bits, granularity=granularity, block_size=block, search="minmax"
        )[0]
    if a_bits is not None:
        for name, m in input_absmax(model, layers, act_batch, seed).items():
            tensors[f"quant.{name}.input_scale"] = activation_scale(torch.tensor([m]), a_bits, search="minmax")[0]
    recipe = Recipe(
        method="minmax", precision=precision, layers=tuple(layers), model_hash=state_dict_hash(model),
        model_config=model.config.to_dict(), weight_bits=w_bits, act_bits=a_bits, weight_granularity=granularity,
        block_size=block, scale_search="minmax", act_scale_search="minmax",
        calibration=CalibrationSettings(steps="0", timesteps=0, samples=act_batch, seed=seed),
        notes=("bench/export_scale.py: min-max weight scales, one-batch absmax input scales, random weights",),
    )  # fmt: skip
    return recipe, tensors


# ------------------------------------------------------------------------------ reading the file
def initializer_bytes(t) -> int:
    """Bytes an initializer occupies in the file (inline raw data, or its external data length)."""
    from onnx import TensorProto, numpy_helper

    if t.data_location == TensorProto.EXTERNAL:
        return int(next((e.value for e in t.external_data if e.key == "length"), 0))
    if t.raw_data:
        return len(t.raw_data)
    return numpy_helper.to_array(t).nbytes


def linear_weight_bytes(path: Path, layers: list[str], quantized: bool) -> dict[str, int]:
    """Stored bytes of the quantized Linears' weights: ``weights`` (the int8/int4 or float matrices)
    and ``scales`` (their DequantizeLinear scales), read from the graph without its external data."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    weights = scales = 0
    if quantized:
        for name in layers:
            weights += initializer_bytes(inits[f"{name}.weight_quantized"])
            scales += initializer_bytes(inits[f"{name}.weight_scale"])
        return {"weights": weights, "scales": scales}
    producer = {o: n for n in model.graph.node for o in n.output}
    nodes = {n.name: n for n in model.graph.node}
    for name in layers:  # export_onnx names each Linear's node "<layer>/MatMul" (or "/Gemm")
        node = nodes.get(f"{name}/MatMul") or nodes[f"{name}/Gemm"]
        w = node.input[1]
        if w not in inits and w in producer and producer[w].op_type == "Transpose":
            w = producer[w].input[0]
        weights += initializer_bytes(inits[w])
    return {"weights": weights, "scales": 0}


# ------------------------------------------------------------------------------------ the child
def run_child(args) -> dict:
    """One export (``args.child`` is the precision) in this process; returns its measurements."""
    import torch

    from ditrt.calibrate.ptq import quantized_layers
    from ditrt.export import check_onnx, export_onnx

    if args.threads:
        torch.set_num_threads(args.threads)
    rss_start = procstat.rss_mib()
    phases = procstat.PhasePeaks()
    t0 = time.perf_counter()
    model = random_model(args.config, args.seed)
    layers = quantized_layers(model)
    recipe = tensors = None
    if args.child != "float":
        recipe, tensors = simple_recipe(model, args.child, block_size=args.block_size, act_batch=args.act_batch, seed=args.seed)
    setup_s = time.perf_counter() - t0
    gc.collect()

    path = Path(args.work) / f"{args.config.replace('/', '_')}-{args.child}-{args.dtype}.onnx"
    rss_before = procstat.rss_mib()
    phases.start("export")
    t0 = time.perf_counter()
    export_onnx(model, path, dtype=args.dtype, recipe=recipe, tensors=tensors)
    export_s = time.perf_counter() - t0
    phases.stop()

    n_params = sum(p.numel() for p in model.parameters())
    linear_elems = sum(model.get_submodule(n).weight.numel() for n in layers)
    del model, recipe, tensors
    gc.collect()

    rss_before_check = procstat.rss_mib()
    phases.start("check")
    t0 = time.perf_counter()
    violations = check_onnx(path)
    check_s = time.perf_counter() - t0
    phases.stop()

    graph_b, data_b = procstat.onnx_file_bytes(path)
    stored = linear_weight_bytes(path, layers, quantized=args.child != "float")
    return {
        "precision": args.child, "dtype": args.dtype, "config": args.config, "onnx": str(path),
        "params": n_params, "quantized_linears": len(layers), "quantized_linear_params": linear_elems,
        "setup_s": setup_s, "export_s": export_s, "check_s": check_s,
        "rss_start_mib": rss_start, "rss_before_export_mib": rss_before, "export_peak_rss_mib": phases.peaks["export"],
        "rss_before_check_mib": rss_before_check, "check_peak_rss_mib": phases.peaks["check"],
        "lifetime_peak_rss_mib": phases.lifetime,
        "graph_bytes": graph_b, "external_data_bytes": data_b, "file_bytes": graph_b + data_b,
        "linear_weight_bytes": stored["weights"], "linear_scale_bytes": stored["scales"],
        "linear_fp16_bytes": 2 * linear_elems,
        "check_violations": [str(v) for v in violations],
    }  # fmt: skip


def spawn_child(args, precision: str, result: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", precision, "--result", str(result),
           "--config", args.config, "--dtype", args.dtype, "--block-size", str(args.block_size),
           "--act-batch", str(args.act_batch), "--seed", str(args.seed), "--work", str(args.work),
           "--threads", str(args.threads or 0), "--cli", args.cli]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not result.exists():
        return {
            "precision": precision,
            "error": f"child exited with {proc.returncode} (killed for memory if -9)",
            "child_wall_s": wall,
        }
    row = json.loads(result.read_text())
    row["child_wall_s"] = wall
    return row


# ----------------------------------------------------------------------------- the CLI cases
def cli_cases(text: str) -> list[tuple[str, str]]:
    """``"w8a8:fp16,float:fp32"`` -> [("w8a8", "fp16"), ("float", "fp32")]."""
    cases = []
    for item in (c.strip() for c in text.split(",") if c.strip()):
        precision, _, dtype = item.partition(":")
        if precision not in PRECISIONS or dtype not in ("fp16", "fp32"):
            sys.exit(f"bad --cli case {item!r}: use precision:dtype with a precision of {', '.join(PRECISIONS)} and fp16 or fp32")
        cases.append((precision, dtype))
    return cases


def cli_inputs(work: Path, config: str, precision: str) -> tuple[Path, Path | None]:
    """Where :func:`prepare_cli` writes the checkpoint and the recipe folder (None for float)."""
    stem = config.replace("/", "_")
    return work / f"{stem}.safetensors", (None if precision == "float" else work / f"{stem}-{precision}-recipe")


def prepare_cli(args) -> dict:
    """(In a child) the random model as a ditrt checkpoint and one recipe folder per quantized precision
    in ``args.cli``, each carrying the model's state dict as ``model.*`` as ``ditrt calibrate`` does."""
    from ditrt.contracts.recipe import save_recipe
    from ditrt.models.checkpoints import save_ditrt_checkpoint

    model = random_model(args.config, args.seed)
    ckpt, _ = cli_inputs(args.work, args.config, "float")
    save_ditrt_checkpoint(model, ckpt)
    for precision in sorted({p for p, _ in cli_cases(args.cli) if p != "float"}):
        recipe, tensors = simple_recipe(model, precision, block_size=args.block_size, act_batch=args.act_batch, seed=args.seed)
        tensors.update({f"model.{k}": v for k, v in model.state_dict().items()})
        save_recipe(recipe, tensors, cli_inputs(args.work, args.config, precision)[1])
    return {"checkpoint_bytes": ckpt.stat().st_size}


def spawn_cli(args, precision: str, dtype: str) -> dict:
    """``ditrt export`` in its own process; its peak RSS from ``os.wait4``."""
    ckpt, recipe = cli_inputs(args.work, args.config, precision)
    out = args.work / f"cli-{args.config.replace('/', '_')}-{precision}-{dtype}.onnx"
    cmd = [sys.executable, "-m", "ditrt", "export", "--model", str(ckpt), *(["--recipe", str(recipe)] if recipe else []),
           "--dtype", dtype, "--out", str(out), "--json"]  # fmt: skip
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
    log = args.work / f"cli-{precision}-{dtype}.json"
    t0 = time.perf_counter()
    with open(log, "w") as stdout:
        proc = subprocess.Popen(cmd, stdout=stdout, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    row = {"path": "cli", "precision": precision, "dtype": dtype, "config": args.config, "onnx": str(out),
           "command": " ".join(["ditrt", *cmd[3:]]), "child_wall_s": wall}  # fmt: skip
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        return {**row, "error": f"ditrt export exited with {code} (killed for memory if -9)"}
    result = json.loads(log.read_text())
    graph_b, data_b = procstat.onnx_file_bytes(out)
    inputs = ckpt.stat().st_size + (sum(f.stat().st_size for f in recipe.iterdir()) if recipe else 0)
    return {**row, "peak_rss_mib": usage.ru_maxrss / 1024, "export_s": result["seconds"],
            "graph_bytes": graph_b, "external_data_bytes": data_b, "file_bytes": graph_b + data_b, "input_bytes": inputs,
            "check_violations": [v["message"] for g in result["graphs"] for v in g["violations"]]}  # fmt: skip


# ------------------------------------------------------------------------------------ reporting
def cli_table(rows: list[dict], meta: dict) -> str:
    head = "| ditrt export | peak RSS (MiB) | file MiB (graph + data) | checkpoint + recipe MiB on disk | wall s | export s | check_onnx |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        what = f"{r['precision']} ({r['dtype']})"
        if "error" in r:
            lines.append(f"| {what} | {r['error']} |" + " |" * (head.count("|") - 3))
            continue
        files = f"{r['file_bytes'] / MIB:,.0f} ({r['graph_bytes'] / MIB:,.0f} + {r['external_data_bytes'] / MIB:,.0f})"
        check = "pass" if not r["check_violations"] else f"{len(r['check_violations'])} violations"
        lines.append(f"| {what} | {r['peak_rss_mib']:,.0f} | {files} | {r['input_bytes'] / MIB:,.0f} | "
                     f"{r['child_wall_s']:.1f} | {r['export_s']:.1f} | {check} |")  # fmt: skip
    notes = [
        "The CLI process's whole-life peak (ru_maxrss from os.wait4): loading the recipe folder and the checkpoint, "
        "export_model and check_onnx, as `ditrt export --model CKPT --recipe DIR --dtype D --out F --json` runs them.",
        "Each recipe folder holds the model's float32 state dict (model.*) beside its scales, as `ditrt calibrate` writes it, "
        "so the command holds two float32 copies of the weights before it exports.",
        f"Machine: {meta['machine']}; torch {meta['torch']}, onnx {meta['onnx']}, ditrt {meta['ditrt']}.",
    ]
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def remove_graph(onnx: str) -> None:
    """Delete a measured graph and its external data (the next export needs the disk)."""
    for f in (Path(onnx), Path(onnx + ".data")):
        f.unlink(missing_ok=True)


def table(rows: list[dict], meta: dict) -> str:
    if not rows:
        return ""
    head = (
        "| precision | export s | RSS before export (MiB) | peak RSS in export (MiB) | peak RSS in check (MiB) | child peak RSS (MiB) "
        "| file MiB (graph + data) | quantized Linear weights MiB | vs their fp16 size | with scales | check_onnx | check s |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['precision']} | {r['error']} |" + " |" * (head.count("|") - 3))
            continue
        fp16 = r["linear_fp16_bytes"]
        files = f"{r['file_bytes'] / MIB:,.0f} ({r['graph_bytes'] / MIB:,.0f} + {r['external_data_bytes'] / MIB:,.0f})"
        check = "pass" if not r["check_violations"] else f"{len(r['check_violations'])} violations"
        lines.append(
            f"| {r['precision']} ({r['dtype']}) | {r['export_s']:.1f} | {r['rss_before_export_mib']:,.0f} | "
            f"{r['export_peak_rss_mib']:,.0f} | {r['check_peak_rss_mib']:,.0f} | {r['lifetime_peak_rss_mib']:,.0f} | {files} | "
            f"{r['linear_weight_bytes'] / MIB:,.1f} | {r['linear_weight_bytes'] / fp16:.3f} | "
            f"{(r['linear_weight_bytes'] + r['linear_scale_bytes']) / fp16:.3f} | {check} | {r['check_s']:.1f} |"
        )
    ok = [r for r in rows if "error" not in r]
    notes = [
        f"{meta['config']}: {ok[0]['params'] / 1e6:.1f} M parameters, {ok[0]['quantized_linears']} quantized Linears "
        f"({ok[0]['quantized_linear_params'] / 1e6:.1f} M weights, {ok[0]['linear_fp16_bytes'] / MIB:,.0f} MiB in float16)."
        if ok
        else "",
        f"Machine: {meta['machine']}; torch {meta['torch']}, onnx {meta['onnx']}, ditrt {meta['ditrt']}.",
        (
            "Each export ran in its own child process; 'peak RSS in export' is the peak during export_onnx alone "
            "(VmHWM reset before it), 'child peak' the whole child's peak (model build, recipe, export, check)."
        ),
        (
            "Quantized Linear weights: the int8/int4 initializers as stored (float graph: its float16 matrices); "
            "'vs their fp16 size' divides by 2 bytes per weight; 'with scales' adds the DequantizeLinear scales."
        ),
    ]
    float_row = next((r for r in ok if r["precision"] == "float"), None)
    if float_row is not None:
        notes.append(
            f"Float graph's own Linear matrices: {float_row['linear_weight_bytes'] / MIB:,.1f} MiB "
            f"({float_row['linear_weight_bytes'] / float_row['linear_fp16_bytes']:.3f} x 2 bytes/weight)."
        )
        for r in ok:
            if r is not float_row:
                notes.append(f"{r['precision']} file / float file: {r['file_bytes'] / float_row['file_bytes']:.3f}.")
    for r in ok:
        for v in r["check_violations"][:5]:
            notes.append(f"check_onnx {r['precision']}: {v}")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes if n) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="DiT-XL/2", help="model config from ditrt.models.dit.CONFIGS (DiT-S/2 for a quick run)")
    p.add_argument("--precisions", default=",".join(PRECISIONS), help=f"comma-separated subset of {','.join(PRECISIONS)}")
    p.add_argument("--dtype", default="fp16", choices=("fp16", "fp32"), help="float type of the exported graph")
    p.add_argument("--cli", default="w8a8:fp16,float:fp16,w8a8:fp32,float:fp32",
                   help="precision:dtype cases run through `ditrt export` from files (empty: none)")  # fmt: skip
    p.add_argument("--block-size", type=int, default=64, help="INT4 block along the input dimension (64 or 128)")
    p.add_argument("--act-batch", type=int, default=2, help="batch of the one forward pass that sets the W8A8 input scales")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads in each child (default: torch's)")
    p.add_argument("--out", type=Path, default=HERE / "results", help="folder for export_scale.json and export_scale.md")
    p.add_argument("--name", default="export_scale", help="base name of the result files in --out")
    p.add_argument("--work", type=Path, default=None, help="folder for the ONNX files (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the ONNX files (deleted after measuring by default)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        row = prepare_cli(args) if args.child == "prepare" else run_child(args)
        args.result.write_text(json.dumps(row, indent=2))
        return 0
    import onnx
    import torch

    from ditrt import __version__
    from ditrt.contracts.model_config import CONFIGS

    if args.config not in CONFIGS:
        sys.exit(f"unknown --config {args.config!r}; choose one of: {', '.join(CONFIGS)}")
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad:
        sys.exit(f"unknown precision {bad[0]!r}; choose from {', '.join(PRECISIONS)}")
    cases = cli_cases(args.cli)
    own_work = args.work is None
    args.work = Path(tempfile.mkdtemp(prefix="ditrt-export-scale-")) if own_work else args.work
    args.work.mkdir(parents=True, exist_ok=True)
    meta = {
        "config": args.config, "dtype": args.dtype, "block_size": args.block_size, "act_batch": args.act_batch, "seed": args.seed,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
                   f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / (1 << 30):.0f} GiB RAM",
        "torch": torch.__version__, "onnx": onnx.__version__, "ditrt": __version__, "python": platform.python_version(),
    }  # fmt: skip
    rows, cli_rows = [], []
    try:
        for precision in precisions:
            print(f"exporting {args.config} {precision} ({args.dtype}) in a child process ...", flush=True)
            row = spawn_child(args, precision, args.work / f"{precision}.json")
            rows.append(row)
            if "error" in row:
                print(f"  failed: {row['error']}", flush=True)
                continue
            print(f"  {row['export_s']:.1f} s, peak {row['export_peak_rss_mib']:,.0f} MiB, "
                  f"{row['file_bytes'] / MIB:,.0f} MiB, check: {len(row['check_violations'])} violations", flush=True)  # fmt: skip
            if not args.keep:
                remove_graph(row["onnx"])
        if cases:
            print(f"writing {args.config} as a checkpoint and recipe folders for the CLI cases ...", flush=True)
            prepared = spawn_child(args, "prepare", args.work / "prepare.json")
            if "error" in prepared:
                sys.exit(f"preparing the CLI inputs failed: {prepared['error']}")
        for precision, dtype in cases:
            print(f"ditrt export {args.config} {precision} ({dtype}) ...", flush=True)
            row = spawn_cli(args, precision, dtype)
            cli_rows.append(row)
            if "error" in row:
                print(f"  failed: {row['error']}", flush=True)
                continue
            print(f"  peak {row['peak_rss_mib']:,.0f} MiB for a {row['file_bytes'] / MIB:,.0f} MiB graph "
                  f"({row['child_wall_s']:.1f} s), check: {len(row['check_violations'])} violations", flush=True)  # fmt: skip
            if not args.keep:
                remove_graph(row["onnx"])
    finally:
        if own_work and not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)
    text = table(rows, meta)
    if cli_rows:
        text += ("\n" if text else "") + f"## The model as `ditrt export` holds it ({args.config})\n\n" + cli_table(cli_rows, meta)
    payload = {"meta": meta, "rows": rows, "cli_rows": cli_rows}
    procstat.write_results(args.out, args.name, payload, f"Export at scale: {args.config}, {args.dtype} graphs", text)
    return 1 if any("error" in r or r.get("check_violations") for r in rows + cli_rows) else 0


if __name__ == "__main__":
    sys.exit(main())
