"""``ditrt calibrate``: a quantization recipe for a model."""

from __future__ import annotations

import time
from pathlib import Path

import click

from ditrt.cli import main
from ditrt.cli.options import device_option, model_option, resolve_device


@main.command()
@model_option
@click.option("--method", type=click.Choice(["minmax", "smoothquant", "ptq4dit", "ditas", "qdit"]), default="ptq4dit", show_default=True,
              help="ptq4dit: CSB+SSC balancing; ditas: smoothing with a per-layer alpha search; qdit: per-layer INT4 block search.")  # fmt: skip
@click.option("--precision", type=click.Choice(["w8a8", "w4a16", "w4a8"]), default="w8a8", show_default=True,
              help="w8a8 and w4a16 deploy to TensorRT; w4a8 (the papers' setting) is simulation only.")  # fmt: skip
@click.option("--calib-timesteps", default=25, show_default=True, type=int, help="Recorded steps of the sampling run.")
@click.option("--calib-samples", default=32, show_default=True, type=int, help="Images per recorded step (each also null-class).")
@click.option("--steps", default="250", show_default=True, help="Sampling schedule the calibration run uses.")
@click.option("--cfg-scale", default=1.5, show_default=True, type=float)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--quantize-all", is_flag=True, help="Also quantize embedders, adaLN and the final layer (the paper's setting).")
@click.option("--alpha", default=0.5, show_default=True, type=float, help="SmoothQuant migration strength.")
@click.option("--scale-search", type=click.Choice(["minmax", "percentile", "mse"]), default=None,
              help="Scale search for weights and activations [default: minmax for --method minmax, else mse].")  # fmt: skip
@click.option("--asymmetric", is_flag=True, help="Asymmetric quantizers (simulation only: TensorRT needs zero point 0).")
@click.option("--block-size", type=click.Choice(["64", "128"]), default="64", show_default=True, help="INT4 weight block (w4a16).")
@click.option("--timestep-groups", default=1, show_default=True, type=int,
              help="K activation-scale groups over the trajectory; exports one graph per group.")  # fmt: skip
@click.option("--dynamic-activations", is_flag=True, help="Per-sample activation scales at run time (Q-DiT; simulation only).")
@click.option("--reconstruct", is_flag=True, help="BRECQ/AdaRound block reconstruction after calibration (any method).")
@click.option("--reconstruct-iters", type=int, default=None, help="Reconstruction iterations per block [default: see docs].")
@click.option("--qdit-budget", type=float, default=None, help="qdit: minimum mean INT4 group size (weights-weighted).")
@click.option("--qdit-fitness", type=click.Choice(["psnr", "fd", "proxy"]), default="psnr", show_default=True,
              help="qdit: paired PSNR or FD of a small sample set (pixel models), or the layer-output error (any model).")  # fmt: skip
@click.option("--qdit-choices", default="64,128", show_default=True,
              help="qdit: INT4 choices; 'channel' adds per-channel INT4 (not a TensorRT format: simulation only).")  # fmt: skip
@device_option
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path))
def calibrate(model_spec, method, precision, calib_timesteps, calib_samples, steps, cfg_scale, seed, quantize_all, alpha,
              scale_search, asymmetric, block_size, timestep_groups, dynamic_activations, reconstruct, reconstruct_iters,
              qdit_budget, qdit_fitness, qdit_choices, device, out_dir):  # fmt: skip
    """Calibrate a model: writes OUT/recipe.json and OUT/weights.safetensors."""
    from ditrt.calibrate.ptq import CalibrateConfig
    from ditrt.calibrate.ptq import calibrate as run_calibration
    from ditrt.contracts.recipe import CalibrationSettings, save_recipe
    from ditrt.diffusion.recording import record_calibration_inputs
    from ditrt.models.builtin import is_pixel_model, load_model

    device = resolve_device(device)
    settings = CalibrationSettings(steps=str(steps), timesteps=calib_timesteps, samples=calib_samples, cfg_scale=cfg_scale, seed=seed)
    config = CalibrateConfig(
        method=method, precision=precision, quantize_all=quantize_all, alpha=alpha, scale_search=scale_search,
        symmetric=not asymmetric, block_size=int(block_size), timestep_groups=timestep_groups,
        dynamic_activations=dynamic_activations, reconstruct=reconstruct, reconstruct_iters=reconstruct_iters,
        qdit_budget=qdit_budget, qdit_fitness=qdit_fitness, qdit_candidates=_choices(qdit_choices), calibration=settings,
    )  # fmt: skip
    if calib_timesteps <= 0 or calib_samples <= 0:
        from ditrt.contracts.errors import ConfigError

        raise ConfigError("--calib-timesteps and --calib-samples must be positive")
    start = time.time()
    model = load_model(model_spec).to(device)
    batches = record_calibration_inputs(model, settings, device=device, pixel_space=is_pixel_model(model), progress=True)
    recipe, tensors = run_calibration(model, config, batches, device=device)
    save_recipe(recipe, tensors, out_dir)
    took = time.time() - start
    click.echo(
        f"wrote {out_dir}/recipe.json: {method} {precision}, {len(recipe.layers)} layers quantized, "
        f"{len(recipe.balanced_layers)} balanced, {took:.1f} s"
    )
    for note in recipe.notes:
        click.echo(f"note: {note}")
    if recipe.layer_block_sizes:
        click.echo("INT4 blocks: " + ", ".join(f"{n} {b or 'channel'}" for n, b in recipe.layer_block_sizes.items()))
    if recipe.timestep_groups > 1:
        click.echo(f"timestep groups: {recipe.timestep_groups}, edges {list(recipe.timestep_group_edges)}")


def _choices(text: str) -> tuple[int, ...]:
    from ditrt.contracts.errors import ConfigError
    from ditrt.contracts.precisions import INT4_BLOCK_SIZES

    out = []
    for part in text.split(","):
        part = part.strip()
        if part == "channel":
            out.append(0)
        elif part in {str(b) for b in INT4_BLOCK_SIZES}:
            out.append(int(part))
        else:
            raise ConfigError(f"--qdit-choices takes 64, 128 and channel (comma-separated), got {part!r}")
    return tuple(out)
