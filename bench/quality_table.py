"""The quality table: float vs minmax / smoothquant / ptq4dit at w8a8, w4a16, w4a8 (simulated),
on the built-in model and its stress variant, at 250, 100 and 50 sampling steps.

A benchmark, not a test: it writes docs/results/quality.md and docs/results/quality.json.

    .venv/bin/python bench/quality_table.py --num 100 --out docs/results

Primary columns: paired PSNR of each quantized model's samples against the float model's samples
made from the same seeds and labels, and the mean per-timestep relative error of the noise
prediction on the calibration trajectory. FD (with its floor) and class accuracy are sanity columns.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ditrt import __version__
from ditrt.calibrate.observe import observe_linear_inputs, record_calibration_inputs
from ditrt.calibrate.ptq import CalibrateConfig, calibrate
from ditrt.calibrate.simulate import quantized_model
from ditrt.calibrate.stress import inject_salient_channels
from ditrt.diffusion.sample_set import generate
from ditrt.diffusion.sampler import SamplerConfig
from ditrt.models.builtin import load_model
from ditrt.models.checkpoints import atomic_write
from ditrt.quality import metrics
from ditrt.recipe import CalibrationSettings

METHODS = ("minmax", "smoothquant", "ptq4dit")
PRECISIONS = ("w8a8", "w4a16", "w4a8")


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


def run(args) -> dict:
    torch.manual_seed(0)
    base = load_model("builtin")
    settings = CalibrationSettings()
    labels = [i % 10 for i in range(args.num)]
    seeds = list(range(args.num))
    results = {"settings": vars(args), "ditrt_version": __version__, "torch": torch.__version__,
               "machine": f"{platform.machine()} {torch.get_num_threads()} threads", "rows": []}  # fmt: skip
    t0 = time.time()
    base_batches = record_calibration_inputs(base, settings, pixel_space=True)
    variants = {"builtin": (base, base_batches)}
    if not args.skip_stress:
        stressed, info = stress_variant(base, base_batches)
        variants["stress"] = (stressed, record_calibration_inputs(stressed, settings, pixel_space=True))
        results["stress_variant"] = info
    for vname, (model, batches) in variants.items():
        recipes = {}
        for method in METHODS:
            for precision in PRECISIONS:
                c0 = time.time()
                recipe, tensors = calibrate(model, CalibrateConfig(method=method, precision=precision, calibration=settings), batches)
                q = quantized_model(model, recipe, tensors)
                recipes[(method, precision)] = (q, time.time() - c0, noise_error(model, q, batches))
                log(f"{vname} {method} {precision}: calibrated in {time.time() - c0:.1f} s")
        for steps in args.steps:
            ref = sample_images(model, steps, labels, seeds)
            results["rows"].append(_row(vname, "float", "fp32", steps, ref, ref, labels, 0.0, (0.0, 0.0)))
            for (method, precision), (q, ctime, nerr) in recipes.items():
                imgs = sample_images(q, steps, labels, seeds)
                results["rows"].append(_row(vname, method, precision, steps, ref, imgs, labels, ctime, nerr))
                log(f"{vname} {steps} {method} {precision}: psnr {results['rows'][-1]['psnr_db']:.2f} dB")
    results["fd_floor"] = metrics.fd_floor()
    results["seconds"] = round(time.time() - t0, 1)
    return results


def _row(variant, method, precision, steps, ref, imgs, labels, ctime, nerr) -> dict:
    return {
        "model": variant, "method": method, "precision": precision, "steps": steps,
        "psnr_db": metrics.paired_psnr(ref, imgs), "noise_rel_error_mean": nerr[0], "noise_rel_error_max": nerr[1],
        "fd": metrics.fd_to_real(imgs), "class_accuracy": metrics.class_accuracy(imgs, labels), "calib_seconds": round(ctime, 1),
    }  # fmt: skip


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def markdown(results: dict, command: str) -> str:
    lines = [
        "# Quality of quantized recipes on the built-in model",
        "",
        f"Generated by `{command}` (ditrt {results['ditrt_version']}, torch {results['torch']}, "
        f"{results['machine']}, {results['seconds']:.0f} s). Do not edit by hand.",
        "",
        f"{results['settings']['num']} samples per row (labels cycling 0-9, seeds 0..N-1), cfg 1.5, DDPM; "
        "calibration: 25 steps of the 250-step run x 32 samples (+ null class). "
        "PSNR: against the float model's samples with the same seeds (higher is better; primary). "
        "noise err: mean (max) over the 25 calibration steps of the relative L2 error of the noise prediction "
        f"(primary). FD floor (two halves of the real digits): {results['fd_floor']:.2f}. "
        "w4a8 is simulation only (no TensorRT format).",
        "",
    ]
    for variant in dict.fromkeys(r["model"] for r in results["rows"]):
        lines += [f"## {variant}", ""]
        lines += ["| steps | method | precision | PSNR dB | noise err mean (max) | FD | class acc | calib s |", "|---|---|---|---|---|---|---|---|"]
        for r in results["rows"]:
            if r["model"] != variant:
                continue
            psnr = "ref" if r["method"] == "float" else f"{r['psnr_db']:.2f}"
            err = "-" if r["method"] == "float" else f"{r['noise_rel_error_mean']:.4f} ({r['noise_rel_error_max']:.4f})"
            lines.append(
                f"| {r['steps']} | {r['method']} | {r['precision']} | {psnr} | {err} | {r['fd']:.2f} | {r['class_accuracy']:.3f} | "
                f"{r['calib_seconds'] if r['method'] != 'float' else '-'} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num", type=int, default=100)
    p.add_argument("--steps", nargs="+", default=["250", "100", "50"])
    p.add_argument("--skip-stress", action="store_true")
    p.add_argument("--out", type=Path, default=Path("docs/results"))
    args = p.parse_args()
    results = run(args)
    command = "python bench/quality_table.py " + " ".join(sys.argv[1:])
    atomic_write(args.out / "quality.json", lambda tmp: tmp.write_text(json.dumps(results, indent=2, default=str)))
    atomic_write(args.out / "quality.md", lambda tmp: tmp.write_text(markdown(results, command)))
    print(markdown(results, command))


if __name__ == "__main__":
    main()
