"""``ditrt build``: a TensorRT engine (and its sidecar) from an exported ONNX graph."""

from __future__ import annotations

from pathlib import Path

import click

from ditrt.cli import main
from ditrt.cli.options import emit_json, is_cuda_device, json_option, mib_to_bytes, say, workspace_option
from ditrt.contracts.errors import ConfigError


@main.command()
@click.option("--onnx", "onnx_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Graph from `ditrt export`, or its M.groups.json for a recipe with timestep groups (one engine per group).")  # fmt: skip
@click.option("--out", "out_path", required=True, type=click.Path(path_type=Path),
              help="Output FILE: the engine to write (its sidecar goes to OUT.json; for a manifest, OUT stem.g<i>.plan and OUT stem.groups.json).")  # fmt: skip
@click.option("--batch", default="1:4:16", show_default=True,
              help="Images per sampler call, MIN:OPT:MAX (or N for 1:N:N); doubled for classifier-free guidance.")  # fmt: skip
@click.option("--no-cfg", is_flag=True, help="The engine will only run unguided (cfg scale 1): do not double the batch.")
@click.option("--opt-level", type=click.IntRange(0, 5), default=None, help="Builder optimization level [default: TensorRT's, 3].")
@click.option("--timing-cache", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Tactic timing cache: read if it exists, updated after the build.")  # fmt: skip
@workspace_option
@click.option("--device", default="auto", show_default=True,
              help="GPU to build on: auto (the current CUDA device) or cuda[:N]. The engine runs only on that GPU model.")  # fmt: skip
@json_option
def build(onnx_path, out_path, batch, no_cfg, opt_level, timing_cache, workspace, device, as_json):
    """Build a strongly typed TensorRT engine for this GPU: writes OUT and OUT.json.

    From a timestep-group manifest: one engine per group (OUT stem.g<i>.plan, each with its sidecar)
    and OUT stem.groups.json, which `ditrt sample --engine` takes."""
    from ditrt.contracts.files import check_writable
    from ditrt.contracts.groups import is_group_manifest, read_manifest
    from ditrt.contracts.profile import BuildConfig, parse_batch
    from ditrt.contracts.sidecar import load_sidecar, sidecar_path
    from ditrt.engines.build import build_engines

    echo = say(as_json)
    gpu = _build_device(device)
    lo, opt, hi = parse_batch(batch)
    config = BuildConfig(
        batch_min=lo, batch_opt=opt, batch_max=hi, cfg=not no_cfg, opt_level=opt_level, timing_cache=timing_cache,
        workspace=mib_to_bytes(workspace),
    )  # fmt: skip
    check_writable(out_path)
    rows = config.engine_batch
    images = f"{hi} images per call with guidance" if config.cfg else f"{hi} images per call, unguided"
    artifact = build_engines(onnx_path, out_path, config, device=gpu)  # one engine, or one per timestep group and their manifest
    if is_group_manifest(artifact):
        manifest = artifact
        edges, engines = read_manifest(manifest, "tensorrt")
        sidecar = load_sidecar(engines[0])
        size = sum(e.stat().st_size for e in engines) / 1e6
        if as_json:
            emit_json({"manifest": str(manifest), "engines": [str(e) for e in engines], "edges": list(edges), "size_bytes": int(size * 1e6),
                       "precision": sidecar.precision, "engine_batch": list(rows), "cfg": config.cfg,
                       "tensorrt_version": sidecar.tensorrt_version, "gpu": sidecar.gpu_name})  # fmt: skip
            return
        echo(
            f"wrote {manifest} ({len(engines)} engines for timestep groups split at {list(edges)}, {size:.1f} MB, "
            f"{sidecar.precision}, batch {rows[0]}..{rows[2]} = {images}; TensorRT {sidecar.tensorrt_version} on "
            f"{sidecar.gpu_name}): pass it as --engine to `ditrt sample`"
        )
        return
    sidecar = load_sidecar(out_path)
    if as_json:
        emit_json({"engine": str(out_path), "sidecar": str(sidecar_path(out_path)), "size_bytes": out_path.stat().st_size,
                   "precision": sidecar.precision, "engine_batch": list(rows), "cfg": config.cfg,
                   "tensorrt_version": sidecar.tensorrt_version, "gpu": sidecar.gpu_name})  # fmt: skip
        return
    echo(
        f"wrote {out_path} ({out_path.stat().st_size / 1e6:.1f} MB, {sidecar.precision}, batch {rows[0]}..{rows[2]} = {images}; "
        f"TensorRT {sidecar.tensorrt_version} on {sidecar.gpu_name}) and {sidecar_path(out_path).name}"
    )


def _build_device(device: str) -> str | None:
    """``--device``: None (auto: the current CUDA device) or ``cuda[:N]``; TensorRT has no CPU builder."""
    if device == "auto":
        return None
    if not is_cuda_device(device):
        raise ConfigError(f"--device {device}: TensorRT builds engines on a GPU; pass auto or cuda[:N]")
    return device
