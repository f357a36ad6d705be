"""The quality table: float vs every calibration method at w8a8, w4a16, w4a8 (simulated), on the
built-in model and its stress variant, at 250, 100 and 50 sampling steps.

A benchmark, not a test: it writes docs/results/quality.md and docs/results/quality.json.

    .venv/bin/python bench/quality_table.py --num 32 --out docs/results

Each row is cached (``--cache``) as soon as it is measured, so the table can be built in parts
(``--models``, ``--methods``, ``--precisions``, ``--steps`` select what to measure) and is always
written from every cached row measured with the same ``--num``.

A method is a spec: a base method (``minmax``, ``smoothquant``, ``ptq4dit``, and whatever else
``ditrt calibrate --method`` accepts), optionally followed by ``+option`` suffixes that map to
:class:`CalibrateConfig` fields, e.g. ``ptq4dit+recon`` (block reconstruction), ``minmax+k4``
(4 timestep groups of activation scales), ``qdit+dyn`` (dynamic activations, simulation only),
``ptq4dit+mm`` (min-max scales instead of the MSE clip search).

Primary columns: paired PSNR of each quantized model's samples against the float model's samples
made from the same seeds and labels, and the mean per-timestep relative error of the noise
prediction on the calibration trajectory. FD (with its floor) and class accuracy are sanity columns.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ditrt import __version__
from ditrt.calibrate.observe import observe_linear_inputs
from ditrt.calibrate.ptq import CalibrateConfig, calibrate
from ditrt.calibrate.stress import inject_salient_channels
from ditrt.contracts.files import atomic_write
from ditrt.contracts.recipe import CalibrationSettings
from ditrt.diffusion.recording import record_calibration_inputs
from ditrt.diffusion.sample_set import generate
from ditrt.diffusion.sampler import SamplerConfig
from ditrt.models.builtin import load_model
from ditrt.models.quantized import quantized_model
from ditrt.quality import metrics

METHODS = ("minmax", "smoothquant", "ptq4dit")
PRECISIONS = ("w8a8", "w4a16", "w4a8")
REL_FD_MIN_NUM = 256  #: tables of at least this many samples per row show FD relative to float
#: method-spec suffix -> CalibrateConfig fields
OPTIONS = {
    "recon": {"reconstruct": True},
    "dyn": {"dynamic_activations": True},
    "k2": {"timestep_groups": 2},
    "k4": {"timestep_groups": 4},
    "mm": {"weight_search": "minmax", "act_search": "minmax"},  # min-max scales instead of the MSE clip search (non-minmax methods' default)
}


def config_for(spec: str, precision: str, settings: CalibrationSettings) -> CalibrateConfig:
    base, *opts = spec.split("+")
    fields = {}
    for o in opts:
        if o not in OPTIONS:
            raise SystemExit(f"unknown method option +{o}; known: {', '.join(OPTIONS)}")
        fields.update(OPTIONS[o])
    return CalibrateConfig(method=base, precision=precision, calibration=settings, **fields)


def stress_variant(model, batches):
    """The built-in model with DiT-like salient channels injected by an exact transform."""
    stressed = copy.deepcopy(model)
    names = [f"blocks.{i}.{n}" for i in range(len(model.blocks)) for n in ("attn.qkv", "mlp.fc1")]
    stats = observe_linear_inputs(model, names, batches)
    sal = {n: s.channel_max_by_step().amax(0) for n, s in stats.items()}
    info = inject_salient_channels(stressed, act_salience=sal, seed=0)
    return stressed.eval(), info


def noise_error(ref, test, batches) -> tuple[float, float]:
    """Mean and max over recorded steps of the relative error of the noise prediction."""
    rows = metrics.error_by_timestep(ref, test, batches, channels=ref.config.in_channels)
    errs = [r["rel_error"] for r in rows]
    return float(np.mean(errs)), float(np.max(errs))


def sample_images(model, steps: str, labels, seeds):
    cfg = model.config
    sampler = SamplerConfig(steps=steps, cfg_scale=1.5, clip_denoised=True)
    return generate(model, sampler, labels, seeds, num_classes=cfg.num_classes, image_shape=(1, 8, 8), batch_size=512)


class Cache:
    """One JSON file per measured row, one npz per float reference sample set."""

    def __init__(self, root: Path, num: int):
        self.root = Path(root) / f"n{num}"
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, *key, ext="json") -> Path:
        return self.root / ("__".join(str(k) for k in key) + f".{ext}")

    def row(self, *key) -> dict | None:
        p = self._path(*key)
        return json.loads(p.read_text()) if p.exists() else None

    def put_row(self, row: dict, *key) -> None:
        atomic_write(self._path(*key), lambda tmp: tmp.write_text(json.dumps(row, indent=1)))

    def reference(self, model_name: str, steps: str, make) -> np.ndarray:
        p = self._path(model_name, "float", steps, ext="npy")
        if p.exists():
            return np.load(p)
        imgs = np.asarray(make())

        def write(tmp):
            with open(tmp, "wb") as f:
                np.save(f, imgs)

        atomic_write(p, write)
        return imgs

    def rows(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(self.root.glob("*__*.json"))]  # rows only, not stress_variant.json


def run(args) -> None:
    torch.manual_seed(0)
    cache = Cache(args.cache, args.num)
    base = load_model("builtin")
    settings = CalibrationSettings()
    labels = [i % 10 for i in range(args.num)]
    seeds = list(range(args.num))
    t0 = time.time()
    base_batches = record_calibration_inputs(base, settings, pixel_space=True)
    log(f"calibration inputs recorded in {time.time() - t0:.1f} s")
    variants = {"builtin": lambda: (base, base_batches)}

    def stressed():
        model, info = stress_variant(base, base_batches)
        (cache.root / "stress_variant.json").write_text(json.dumps(info, indent=1, default=str))
        return model, record_calibration_inputs(model, settings, pixel_space=True)

    variants["stress"] = stressed
    for vname in args.models:
        model, batches = variants[vname]()
        refs = {}
        for steps in args.steps:
            c0 = time.time()
            refs[steps] = ref = cache.reference(vname, steps, functools.partial(sample_images, model, steps, labels, seeds))
            if cache.row(vname, "float", "fp32", steps) is None:
                cache.put_row(
                    _row(vname, "float", "fp32", steps, ref, ref, labels, None, (0.0, 0.0), time.time() - c0),
                    vname,
                    "float",
                    "fp32",
                    steps,
                )
            if args.fd_noise and cache.row(vname, "float-reseed", "fp32", steps) is None:
                # the float model again with the next N seeds: how far FD moves by sampling noise alone
                c0 = time.time()
                other = sample_images(model, steps, labels, [s + args.num for s in seeds])
                row = _row(vname, "float-reseed", "fp32", steps, ref, other, labels, None, (0.0, 0.0), time.time() - c0)
                cache.put_row(row, vname, "float-reseed", "fp32", steps)
                log(f"{vname} {steps} float-reseed: FD {row['fd']:.2f} (same seeds: {cache.row(vname, 'float', 'fp32', steps)['fd']:.2f})")
        for spec in args.methods:
            for precision in args.precisions:
                todo = [s for s in args.steps if cache.row(vname, spec, precision, s) is None]
                if not todo:
                    continue
                c0 = time.time()
                recipe, tensors = calibrate(model, config_for(spec, precision, settings), batches)
                q = quantized_model(model, recipe, tensors)
                ctime = time.time() - c0
                nerr = noise_error(model, q, batches)
                log(f"{vname} {spec} {precision}: calibrated in {ctime:.1f} s, noise error {nerr[0]:.4f}")
                for steps in todo:
                    s0 = time.time()
                    imgs = sample_images(q, steps, labels, seeds)
                    row = _row(vname, spec, precision, steps, refs[steps], imgs, labels, ctime, nerr, time.time() - s0)
                    row["deployable"] = recipe.deployable
                    cache.put_row(row, vname, spec, precision, steps)
                    log(f"{vname} {steps} {spec} {precision}: psnr {row['psnr_db']:.2f} dB ({row['sample_seconds']:.0f} s)")


def _row(variant, method, precision, steps, ref, imgs, labels, ctime, nerr, seconds) -> dict:
    return {
        "model": variant, "method": method, "precision": precision, "steps": steps,
        "psnr_db": metrics.paired_psnr(ref, imgs), "noise_rel_error_mean": nerr[0], "noise_rel_error_max": nerr[1],
        "fd": metrics.fd_to_real(imgs), "class_accuracy": metrics.class_accuracy(imgs, labels),
        "calib_seconds": None if ctime is None else round(ctime, 1), "sample_seconds": round(seconds, 1),
    }  # fmt: skip


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _order(rows: list[dict]) -> list[dict]:
    steps = {"250": 0, "100": 1, "50": 2}
    prec = {"fp32": 0, **{p: i + 1 for i, p in enumerate(PRECISIONS)}}
    methods = list(dict.fromkeys(["float", "float-reseed", *METHODS, *sorted(r["method"] for r in rows)]))
    return sorted(
        rows,
        key=lambda r: (
            r["model"] != "builtin",
            steps.get(str(r["steps"]), 9),
            prec.get(r["precision"], 9),
            methods.index(r["method"]),
        ),
    )


def markdown(results: dict, command: str) -> str:
    lines = [
        "# Quality of quantized recipes on the built-in model",
        "",
        (
            f"Generated by `{command}` (ditrt {results['ditrt_version']}, torch {results['torch']}, {results['machine']}). "
            "Do not edit by hand; rows are cached per (model, method, precision, steps) and the table is rebuilt from the cache."
        ),
        "",
        (
            f"{results['num']} samples per row (labels cycling 0-9, seeds 0..N-1), cfg 1.5, DDPM; "
            "calibration: 25 steps of the 250-step run x 32 samples (+ null class). "
            "PSNR: against the float model's samples with the same seeds (higher is better; primary). "
            "noise err: mean (max) over the 25 calibration steps of the relative L2 error of the noise prediction "
            f"(primary). FD floor (two halves of the real digits, ~900 each): {results['fd_floor']:.2f}; FD of "
            f"{results['num']} samples carries a small-sample bias, so compare FDs within this table only. "
            "calib s: calibration time on the recorded inputs (the shared 250-step recording run excluded). "
            "Rows marked (sim) are simulation only (no TensorRT format): w4a8, asymmetric or dynamic activations. "
            "float-reseed: the float model with the next N seeds, so its FD against the float row is the spread that "
            "sampling noise alone gives FD at this N."
        ),
        "",
    ]
    for variant in dict.fromkeys(r["model"] for r in results["rows"]):
        lines += [f"## {variant}", ""]
        rel = results["num"] >= REL_FD_MIN_NUM  # below it the small-sample bias swamps FD differences
        lines += [
            "| steps | method | precision | PSNR dB | noise err mean (max) | FD |" + (" FD vs float |" if rel else "")
            + " class acc | calib s |",
            "|---|---|---|---|---|---|---|---|" + ("---|" if rel else ""),
        ]  # fmt: skip
        float_fd = {r["steps"]: r["fd"] for r in results["rows"] if r["model"] == variant and r["method"] == "float"}
        for r in results["rows"]:
            if r["model"] != variant:
                continue
            is_float = r["method"].startswith("float")
            psnr = "ref" if r["method"] == "float" else "-" if is_float else f"{r['psnr_db']:.2f}"
            fd_rel = f" {100 * (r['fd'] / float_fd[r['steps']] - 1):+.1f}% |" if rel and r["steps"] in float_fd else " - |" if rel else ""
            err = "-" if is_float else f"{r['noise_rel_error_mean']:.4f} ({r['noise_rel_error_max']:.4f})"
            prec = r["precision"] + ("" if is_float or r.get("deployable", True) else " (sim)")
            calib = "-" if r.get("calib_seconds") is None else r["calib_seconds"]
            lines.append(
                f"| {r['steps']} | {r['method']} | {prec} | {psnr} | {err} | {r['fd']:.2f} |{fd_rel} {r['class_accuracy']:.3f} | {calib} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num", type=int, default=32)
    p.add_argument("--steps", nargs="+", default=["250", "100", "50"])
    p.add_argument("--models", nargs="+", default=["builtin", "stress"], choices=["builtin", "stress"])
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    p.add_argument("--cache", type=Path, default=Path("runs/quality-cache"))
    p.add_argument("--out", type=Path, default=Path("docs/results"))
    p.add_argument("--table-only", action="store_true", help="rebuild the table from the cache without measuring")
    p.add_argument("--fd-noise", action="store_true", help="also sample the float model with seeds N..2N-1 (FD spread)")
    args = p.parse_args()
    if not args.table_only:
        run(args)
    results = {
        "num": args.num, "ditrt_version": __version__, "torch": torch.__version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "fd_floor": metrics.fd_floor(),
        "rows": _order(Cache(args.cache, args.num).rows()),
    }  # fmt: skip
    command = (
        f"python bench/quality_table.py --num {args.num}{' --fd-noise' if args.fd_noise else ''}  # run in parts with --models/--methods/--precisions, then --table-only"
    )
    text = markdown(results, command)
    atomic_write(args.out / "quality.json", lambda tmp: tmp.write_text(json.dumps(results, indent=2, default=str)))
    atomic_write(args.out / "quality.md", lambda tmp: tmp.write_text(text))
    print(text)


if __name__ == "__main__":
    main()
