"""``ditrt pipeline``."""

from __future__ import annotations

from pathlib import Path

import click

from ditrt.cli import main
from ditrt.cli.options import model_option, parse_classes


@main.command()
@model_option
@click.option("--method", type=click.Choice(["minmax", "smoothquant", "ptq4dit"]), default="ptq4dit", show_default=True)
@click.option("--precision", type=click.Choice(["w8a8", "w4a16"]), default="w8a8", show_default=True)
@click.option("--steps", default="250", show_default=True)
@click.option("--cfg-scale", default=1.5, show_default=True, type=float)
@click.option("--num", default=100, show_default=True, type=int)
@click.option("--classes", default=None)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--calib-timesteps", default=25, show_default=True, type=int)
@click.option("--calib-samples", default=32, show_default=True, type=int)
@click.option("--backend", type=click.Choice(["auto", "tensorrt", "onnxruntime"]), default="auto", show_default=True)
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path))
def pipeline(model_spec, method, precision, steps, cfg_scale, num, classes, seed, calib_timesteps, calib_samples, backend, out_dir):
    """Calibrate, export, check, build, sample float and quantized, evaluate and compare: OUT/report.md."""
    from ditrt.contracts.recipe import CalibrationSettings
    from ditrt.pipeline import PipelineConfig, run_pipeline

    cls = parse_classes(classes)
    config = PipelineConfig(
        method=method, precision=precision, steps=str(steps), cfg_scale=cfg_scale, num=num, seed=seed,
        classes=tuple(cls) if cls else None, backend=backend,
        calibration=CalibrationSettings(timesteps=calib_timesteps, samples=calib_samples, cfg_scale=cfg_scale),
    )  # fmt: skip
    report = run_pipeline(model_spec, config, out_dir, echo=click.echo)
    q = report["quality"]
    click.echo(f"wrote {out_dir}/report.md, report.json and comparison.png")
    if "fd_float" in q:
        click.echo(f"FD float {q['fd_float']:.2f} -> quantized {q['fd_quantized']:.2f} (floor {q['fd_floor']:.2f}); "
                   f"class accuracy {q['class_accuracy_float']:.3f} -> {q['class_accuracy_quantized']:.3f}; "
                   f"paired PSNR {q['psnr_db']:.2f} dB")  # fmt: skip
