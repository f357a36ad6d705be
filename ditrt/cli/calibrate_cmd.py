"""``ditrt calibrate``: a quantization recipe for a model.

The calibration options are :func:`ditrt.cli.calibration_options.calibration_options` (shared with
``ditrt pipeline``). ``--steps``, ``--cfg-scale`` and ``--seed`` are hidden, deprecated spellings of
``--calib-steps``, ``--calib-cfg-scale`` and ``--calib-seed`` here (``--steps`` means the sampling
run's schedule on every other command).

Under ``torchrun --nproc_per_node N -m ditrt calibrate ...`` every rank validates the options, joins
the job (:func:`ditrt.distributed.process_group`; ``--device cuda`` is ``cuda:LOCAL_RANK``), records
and calibrates its share, and gets the same recipe as a single process; rank 0 alone writes and
prints it while the others wait, so the command exits together.
"""

from __future__ import annotations

import time

import click

from ditrt.cli import main
from ditrt.cli.calibration_options import calibrate_config_from_options, calibration_options
from ditrt.cli.options import checkpoint_options, device_option, load_options, model_option, out_folder_option, resolve_device

#: deprecated option of this command -> the calibration option it stands for
_ALIASES = {"steps": "calib_steps", "cfg_scale": "calib_cfg_scale", "seed": "calib_seed"}


def _alias(name: str, target: str):
    return click.option("--" + name.replace("_", "-"), name, default=None, hidden=True,
                        help=f"Deprecated: use --{target.replace('_', '-')}.")  # fmt: skip


@main.command()
@model_option
@checkpoint_options
@calibration_options
@_alias("steps", "calib_steps")
@_alias("cfg_scale", "calib_cfg_scale")
@_alias("seed", "calib_seed")
@device_option
@out_folder_option("recipe.json and weights.safetensors")
def calibrate(model_spec, config_name, num_classes, num_heads, device, out_dir, **options):
    """Calibrate a model: writes OUT/recipe.json and OUT/weights.safetensors."""
    from ditrt.contracts.files import check_writable, output_folder

    options = _resolve_aliases(options)
    config = calibrate_config_from_options(**options)
    check_writable(out_dir, folder=True)
    _check_device_per_rank(device)
    device = resolve_device(device)

    from ditrt.calibrate.ptq import calibrate as run_calibration
    from ditrt.contracts.recipe import save_recipe
    from ditrt.diffusion.recording import record_calibration_inputs
    from ditrt.distributed import barrier, process_group
    from ditrt.models.builtin import is_pixel_model, load_model

    start = time.time()
    with process_group(device) as world:
        device = world.device(device)
        model = load_model(model_spec, **load_options(config_name, num_classes, num_heads)).to(device)
        batches = record_calibration_inputs(model, config.calibration, device=device, pixel_space=is_pixel_model(model),
                                            progress=world.is_main, world=world)  # fmt: skip
        recipe, tensors = run_calibration(model, config, batches, device=device, world=world)
        if world.is_main:
            with output_folder(out_dir):  # both files or neither, also on Ctrl-C
                save_recipe(recipe, tensors, out_dir)
            _report(recipe, out_dir, time.time() - start, world.size)
        barrier(world)  # the other ranks wait for the files, so that the job ends when they exist


def _check_device_per_rank(device: str) -> None:
    """Under torchrun each rank takes its own GPU; one named GPU for every rank is refused before any work."""
    from ditrt.contracts.errors import ConfigError
    from ditrt.distributed import launched

    if launched() and device.startswith("cuda:"):
        raise ConfigError(f"--device {device} would put every torchrun rank on one GPU; use --device cuda "
                          "(rank r takes cuda:LOCAL_RANK) and choose the GPUs with CUDA_VISIBLE_DEVICES")  # fmt: skip


def _report(recipe, out_dir, took: float, processes: int) -> None:
    on = f" on {processes} processes" if processes > 1 else ""
    click.echo(
        f"wrote {out_dir}/recipe.json: {recipe.method} {recipe.precision}, {len(recipe.layers)} layers quantized, "
        f"{len(recipe.balanced_layers)} balanced, {took:.1f} s{on}"
    )
    balance = recipe.details.get("balance")
    if balance and balance["skipped_channels"]:
        click.echo(f"balancing left {balance['skipped_channels']} of {balance['channels']} channels at d = 1 (degenerate salience)")
    for note in recipe.notes:
        click.echo(f"note: {note}")
    if recipe.layer_block_sizes:
        click.echo("INT4 blocks: " + ", ".join(f"{n} {b or 'channel'}" for n, b in recipe.layer_block_sizes.items()))
    if recipe.timestep_groups > 1:
        click.echo(f"timestep groups: {recipe.timestep_groups}, edges {list(recipe.timestep_group_edges)}")


def _resolve_aliases(options: dict) -> dict:
    """Fold the deprecated spellings into their calibration options (giving both is an error)."""
    from ditrt.contracts.errors import ConfigError

    ctx = click.get_current_context()
    for old, new in _ALIASES.items():
        value = options.pop(old)
        if value is None:
            continue
        if ctx.get_parameter_source(new) is not click.core.ParameterSource.DEFAULT:
            raise ConfigError(f"--{old.replace('_', '-')} is the deprecated spelling of --{new.replace('_', '-')}; give only the latter")
        click.echo(f"ditrt: --{old.replace('_', '-')} is deprecated here, use --{new.replace('_', '-')}", err=True)
        param = next(p for p in ctx.command.params if p.name == new)
        options[new] = param.type_cast_value(ctx, value)
    return options
