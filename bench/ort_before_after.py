"""The built-in model's ONNX Runtime step before and after: ditrt's graphs and session settings at an
earlier commit against today's, timed side by side in one process.

A benchmark, not a test (issue 15 asks that the float32 graph be no slower than before). The tree of
``--before`` (default: the last commit before issue 15's changes) is taken out of git into a scratch
folder; each tree exports the built-in model's float32 graph and a W8A8 min-max graph (calibrated on
a short run: its values change accuracy, not speed) in its own interpreter. Then, in this process, one
thread, interleaved repeats of ``--calls`` steps at batch ``--batch`` with guidance:

- ``before``: the old graph with the old session settings (MatMulAddFusion off, nothing else);
- ``after graph, before session``: today's graph with the old settings (what the export changes did);
- ``after``: today's graph with today's settings (:func:`ditrt.runtime.onnxruntime_backend.make_session`).

    .venv/bin/python bench/ort_before_after.py                  # needs the git history (a clone, not an archive)

Results: ``bench/results/ort_profile/before-after-<name>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import procstat
from backends import step_inputs
from ort_profile import time_sessions

BEFORE = "f22cc66"  # the last commit before issue 15 (bench/quality_table: a noise floor per precision)
OLD_SESSION = {"disabled_optimizers": ("MatMulAddFusion",), "fold_bias": False}

EXPORT = """
import sys, torch
torch.set_num_threads(1)
from pathlib import Path
from ditrt.models.builtin import load_model
from ditrt.calibrate.ptq import CalibrateConfig, calibrate
from ditrt.contracts.recipe import CalibrationSettings
from ditrt.diffusion.recording import record_calibration_inputs
from ditrt.export import export_onnx
out = Path(sys.argv[1]); precisions = sys.argv[2].split(",")
model = load_model("builtin").eval()
settings = CalibrationSettings(steps="10", timesteps=2, samples=2)
batches = record_calibration_inputs(model, settings, pixel_space=True)
for p in precisions:
    kw = {}
    if p != "fp32":
        kw = dict(zip(("recipe", "tensors"), calibrate(model, CalibrateConfig(method="minmax", precision=p, calibration=settings, weights="rtn"), batches)))
    export_onnx(model, out / f"{p}.onnx", **kw)
"""


def export_tree(tree: Path, out: Path, precisions: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", EXPORT, str(out), ",".join(precisions)], cwd=tree, env=env, check=True)


def checkout(commit: str, into: Path) -> str:
    """The tree of ``commit`` (git archive) in ``into``; returns the full commit id."""
    full = subprocess.run(["git", "rev-parse", commit], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", full], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return full


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", default=BEFORE, help="the earlier commit")
    p.add_argument("--precisions", default="fp32,w8a8")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per session")
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--out", type=Path, default=HERE / "results" / "ort_profile")
    p.add_argument("--name", default="builtin-b32-t1")
    args = p.parse_args(argv)
    args.precisions = args.precisions.split(",")
    if args.batch < 1 or args.calls < 1 or args.repeats < 1 or args.threads < 1:
        p.error("--batch, --calls, --repeats and --threads must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import onnxruntime

    from ditrt.models.builtin import load_model
    from ditrt.runtime.onnxruntime_backend import make_session

    onnxruntime.set_default_logger_severity(3)
    load_avg = os.getloadavg()[0]
    x, t, y = step_inputs(load_model("builtin").config, args.batch, "cpu")
    feeds = {"x": x.numpy(), "t": t.numpy(), "y": y.numpy()}
    with tempfile.TemporaryDirectory(prefix="ditrt-before-after-") as tmp:
        tmp = Path(tmp)
        print(f"exporting {', '.join(args.precisions)} at {args.before} and at the working tree ...", flush=True)
        commit = checkout(args.before, tmp / "before-tree")
        export_tree(tmp / "before-tree", tmp / "before", args.precisions)
        export_tree(ROOT, tmp / "after", args.precisions)
        sessions = {}
        for p in args.precisions:
            sessions[f"{p} before"] = make_session(tmp / "before" / f"{p}.onnx", threads=args.threads, **OLD_SESSION)
            sessions[f"{p} after graph, before session"] = make_session(tmp / "after" / f"{p}.onnx", threads=args.threads, **OLD_SESSION)
            sessions[f"{p} after"] = make_session(tmp / "after" / f"{p}.onnx", threads=args.threads)
        print(f"timing {args.repeats} x {args.calls} steps per session (interleaved) ...", flush=True)
        times = time_sessions(sessions, feeds, args)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = ["| session | ms/step (median) | spread | vs before (ratio of medians) | vs before (median per-repeat ratio) |", "|---|---|---|---|---|"]
    for k, v in times.items():
        base = times[f"{k.split()[0]} before"]
        paired = statistics.median(b / a for b, a in zip(base, v))
        rows.append(f"| {k} | {med[k]:.2f} | {min(v):.2f}-{max(v):.2f} | {statistics.median(base) / med[k]:.3f}x | {paired:.3f}x |")
    if "fp32" in args.precisions:
        for p in args.precisions[1:]:
            for side in ("before", "after"):
                paired = statistics.median(f / q for f, q in zip(times[f"fp32 {side}"], times[f"{p} {side}"]))
                rows.append(f"| {p}/fp32 speedup, {side} | | | {med[f'fp32 {side}'] / med[f'{p} {side}']:.2f}x | {paired:.2f}x |")
    text = "\n".join([
        f"Built-in model, batch {args.batch} with guidance ({2 * args.batch} rows per step), {args.threads} thread(s), ONNX Runtime {onnxruntime.__version__}; "
        f"before = commit {commit[:10]} with its session settings (MatMulAddFusion off), after = the working tree with today's; "
        f"{args.repeats} interleaved repeats of {args.calls} steps; 1-minute load average {load_avg:.2f} at start ({platform.machine()}, {os.cpu_count()} CPUs).",
        "", *rows, "",
    ])  # fmt: skip
    meta = {"before": commit, "args": {k: str(v) for k, v in vars(args).items()}, "onnxruntime": onnxruntime.__version__, "load_average_at_start": load_avg}
    procstat.write_results(args.out, f"before-after-{args.name}", {"meta": meta, "times": times}, "ONNX Runtime step before and after issue 15", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
