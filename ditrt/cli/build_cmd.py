"""``ditrt build``: a TensorRT engine (and its sidecar) from an exported ONNX graph."""

from __future__ import annotations

from pathlib import Path

import click

from ditrt.cli import main


@main.command()
@click.option("--onnx", "onnx_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Graph from `ditrt export`, or its M.groups.json for a recipe with timestep groups (one engine per group).")  # fmt: skip
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
    """Build a strongly typed TensorRT engine for this GPU: writes OUT and OUT.json.

    From a timestep-group manifest: one engine per group (OUT stem.g<i>.plan, each with its sidecar)
    and OUT stem.groups.json, which `ditrt sample --engine` takes."""
    from ditrt.contracts.groups import is_group_manifest, read_manifest
    from ditrt.contracts.profile import BuildConfig, parse_batch
    from ditrt.contracts.sidecar import load_sidecar, sidecar_path
    from ditrt.engines.build import engine_from_onnx, engines_from_manifest

    lo, opt, hi = parse_batch(batch)
    config = BuildConfig(
        batch_min=lo, batch_opt=opt, batch_max=hi, cfg=not no_cfg, opt_level=opt_level, timing_cache=timing_cache,
        workspace=workspace * (1 << 20) if workspace else None,
    )  # fmt: skip
    rows = config.engine_batch
    images = f"{hi} images per call with guidance" if config.cfg else f"{hi} images per call, unguided"
    if is_group_manifest(onnx_path):
        manifest = engines_from_manifest(onnx_path, out_path, config)
        edges, engines = read_manifest(manifest, "tensorrt")
        sidecar = load_sidecar(engines[0])
        size = sum(e.stat().st_size for e in engines) / 1e6
        click.echo(
            f"wrote {manifest} ({len(engines)} engines for timestep groups split at {list(edges)}, {size:.1f} MB, "
            f"{sidecar.precision}, batch {rows[0]}..{rows[2]} = {images}; TensorRT {sidecar.tensorrt_version} on "
            f"{sidecar.gpu_name}): pass it as --engine to `ditrt sample`"
        )
        return
    engine_from_onnx(onnx_path, out_path, config)
    sidecar = load_sidecar(out_path)
    click.echo(
        f"wrote {out_path} ({out_path.stat().st_size / 1e6:.1f} MB, {sidecar.precision}, batch {rows[0]}..{rows[2]} = {images}; "
        f"TensorRT {sidecar.tensorrt_version} on {sidecar.gpu_name}) and {sidecar_path(out_path).name}"
    )
