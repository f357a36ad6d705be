"""``ditrt build``: a TensorRT engine (and its sidecar) from an exported ONNX graph."""

from __future__ import annotations

from pathlib import Path

import click

from ditrt.cli import main


@main.command()
@click.option("--onnx", "onnx_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Graph from `ditrt export`.")  # fmt: skip
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Engine file to write (its sidecar goes to OUT.json).")  # fmt: skip
@click.option("--batch", default="1:4:16", show_default=True,
              help="Images per sampler call, MIN:OPT:MAX (or N for 1:N:N); doubled for classifier-free guidance.")  # fmt: skip
@click.option("--no-cfg", is_flag=True, help="The engine will only run unguided (cfg scale 1): do not double the batch.")
@click.option("--opt-level", type=click.IntRange(0, 5), default=None, help="Builder optimization level [default: TensorRT's, 3].")
@click.option("--timing-cache", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Tactic timing cache: read if it exists, updated after the build.")  # fmt: skip
@click.option(
    "--workspace", type=click.IntRange(min=1), default=None, help="Builder workspace limit in MiB [default: TensorRT's]."
)
def build(onnx_path, out_path, batch, no_cfg, opt_level, timing_cache, workspace):
    """Build a strongly typed TensorRT engine for this GPU: writes OUT and OUT.json."""
    from ditrt.engines.build import engine_from_onnx
    from ditrt.engines.profile import BuildConfig, parse_batch
    from ditrt.engines.sidecar import load_sidecar, sidecar_path

    lo, opt, hi = parse_batch(batch)
    config = BuildConfig(
        batch_min=lo, batch_opt=opt, batch_max=hi, cfg=not no_cfg, opt_level=opt_level, timing_cache=timing_cache,
        workspace=workspace * (1 << 20) if workspace else None,
    )  # fmt: skip
    engine_from_onnx(onnx_path, out_path, config)
    sidecar = load_sidecar(out_path)
    rows = config.engine_batch
    images = f"{hi} images per call with guidance" if config.cfg else f"{hi} images per call, unguided"
    click.echo(
        f"wrote {out_path} ({out_path.stat().st_size / 1e6:.1f} MB, {sidecar.precision}, batch {rows[0]}..{rows[2]} = {images}; "
        f"TensorRT {sidecar.tensorrt_version} on {sidecar.gpu_name}) and {sidecar_path(out_path).name}"
    )
