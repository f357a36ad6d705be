"""``ditrt pipeline``: the calibration options are :func:`ditrt.cli.calibration_options.calibration_options`,
the same set ``ditrt calibrate`` takes."""

from __future__ import annotations

from pathlib import Path

import click

from ditrt.cli import main
from ditrt.cli.calibration_options import calibrate_config_from_options, calibration_options
from ditrt.cli.options import (
    batch_size_option,
    checkpoint_options,
    device_option,
    emit_json,
    json_option,
    load_options,
    model_option,
    out_folder_option,
    parse_classes,
    resolve_device,
    say,
    steps_option,
)


@main.command()
@model_option
@checkpoint_options
@calibration_options
@steps_option("250")
@click.option("--cfg-scale", default=1.5, show_default=True, type=float,
              help="Classifier-free guidance scale of the sampling run (1 = off); also the calibration run's unless --calib-cfg-scale is given.")  # fmt: skip
@click.option("--num", default=100, show_default=True, type=int, help="Images sampled by each model (float and quantized).")
@click.option("--classes", default=None, help="Comma-separated class ids to cycle through (default: all).")
@click.option("--seed", default=0, show_default=True, type=int, help="Sample i of both models uses seed + i.")
@batch_size_option(256)
@click.option("--backend", type=click.Choice(["auto", "tensorrt", "onnxruntime"]), default="auto", show_default=True,
              help="Quantized backend. auto: TensorRT when it and a GPU are present (and --device is cuda), else ONNX Runtime.")  # fmt: skip
@device_option
@click.option("--vae", "vae_dir", type=click.Path(path_type=Path), default=None,
              help="diffusers AutoencoderKL folder: decode a latent model's samples, then measure and draw the images.")  # fmt: skip
@json_option
@out_folder_option("recipe/, the checked graph, the engine (with TensorRT), float/ and quantized/ samples, inputs.json, report.md, report.json")
def pipeline(model_spec, config_name, num_classes, num_heads, steps, cfg_scale, num, classes, seed, batch_size, backend, device, vae_dir, as_json, out_dir, **options):
    """Calibrate, export, check, build, sample float and quantized, evaluate and compare: OUT/report.md."""
    import dataclasses

    from ditrt.pipeline import PipelineConfig, run_pipeline

    cls = parse_classes(classes)
    config = PipelineConfig(
        steps=str(steps), cfg_scale=cfg_scale, num=num, seed=seed, classes=tuple(cls) if cls else None, batch_size=batch_size,
        backend=backend, device=resolve_device(device), vae=str(vae_dir) if vae_dir is not None else None,
    )  # fmt: skip
    config.validate()  # the sampling options first: --cfg-scale is named as itself before it reaches the calibration run
    ctx = click.get_current_context()
    if ctx.get_parameter_source("calib_cfg_scale") is click.core.ParameterSource.DEFAULT:
        options["calib_cfg_scale"] = cfg_scale  # calibrate on the guidance the samples will use
    config = dataclasses.replace(config, calibrate=calibrate_config_from_options(**options))
    echo = say(as_json)
    report = run_pipeline(model_spec, config, out_dir, echo=echo, load=load_options(config_name, num_classes, num_heads))
    if as_json:
        emit_json(report)
        return
    q = report["quality"]
    echo(f"wrote {out_dir}: " + ", ".join(report["files"]))
    parts = [f"measured on {q['measured_on']}"]
    if "fd_float" in q:
        parts.append(f"FD float {q['fd_float']:.2f} -> quantized {q['fd_quantized']:.2f} (floor {q['fd_floor']:.2f}); "
                     f"class accuracy {q['class_accuracy_float']:.3f} -> {q['class_accuracy_quantized']:.3f}")  # fmt: skip
    if "psnr_db" in q:
        parts.append(f"paired PSNR {q['psnr_db']:.2f} dB")
    if "latent_rel_l2" in q:
        parts.append(f"latent relative L2 {q['latent_rel_l2']:.4f}")
    echo("; ".join(parts))
