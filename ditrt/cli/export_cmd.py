"""``ditrt export`` and ``ditrt check``."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from ditrt.cli import main
from ditrt.cli.options import (
    checkpoint_options,
    device_option,
    emit_json,
    json_option,
    load_options,
    model_option,
    out_file_option,
    say,
)


@main.command()
@model_option
@checkpoint_options
@click.option("--recipe", "recipe_dir", type=click.Path(path_type=Path), default=None,
              help="Recipe folder from `ditrt calibrate`: export its quantized layers as Q/DQ (w8a8, w4a16).")  # fmt: skip
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="fp16: float16 weights and activations, LayerNorm in float32 (for TensorRT).")  # fmt: skip
@click.option("--opset", type=int, default=None, help="ONNX opset [default: 21].")
@device_option
@json_option
@out_file_option("the .onnx graph to write (a recipe with timestep groups also writes OUT stem.g<i>.onnx and OUT stem.groups.json)")
def export(model_spec, config_name, num_classes, num_heads, recipe_dir, dtype, opset, device, as_json, out_path):
    """Export a model (float, or quantized by a recipe) to ONNX with a dynamic batch."""
    from ditrt.contracts.files import check_writable, state_dict_hash
    from ditrt.contracts.groups import is_group_manifest, read_artifact
    from ditrt.contracts.precisions import get_precision
    from ditrt.contracts.recipe import check_recipe_matches, load_recipe
    from ditrt.export import check_onnx
    from ditrt.export.onnx_export import export_model
    from ditrt.models.builtin import load_model

    echo = say(as_json)
    _export_device(device)
    check_writable(out_path)
    recipe = tensors = None
    if recipe_dir is not None:
        recipe, tensors = load_recipe(recipe_dir)
    model = load_model(model_spec, **load_options(config_name, num_classes, num_heads))
    if recipe is not None:
        check_recipe_matches(recipe, state_dict_hash(model), str(model_spec))
    start = time.time()
    what = f"{recipe.method} {recipe.precision}" if recipe else "float"
    artifact = export_model(model, out_path, dtype=dtype, opset=opset, recipe=recipe, tensors=tensors)
    manifest = artifact if is_group_manifest(artifact) else None
    paths = read_artifact(artifact)[2]
    if manifest is not None:
        echo(f"wrote {manifest} ({recipe.timestep_groups} timestep groups, edges {list(recipe.timestep_group_edges)}): "
             "pass it to `ditrt sample` or to `ditrt build --onnx`")  # fmt: skip
    graphs = []
    for path in paths:
        violations = check_onnx(path)
        graphs.append({"path": str(path), "size_bytes": path.stat().st_size, **_check_result(path, violations)})
        echo(f"wrote {path} ({what}, {dtype}, {path.stat().st_size / 1e6:.2f} MB, {time.time() - start:.1f} s); "
             f"ditrt check: {'no violations' if not violations else f'{len(violations)} violations (run ditrt check)'}")  # fmt: skip
    note = None
    if recipe is not None:
        p = get_precision(recipe.precision)
        if p.tensorrt and dtype not in p.export_dtypes:
            note = (f"a {dtype} {p.name} graph runs in ONNX Runtime; TensorRT builds {p.name} from "
                    f"{' or '.join(p.export_dtypes)} graphs only, so export with --dtype {p.export_dtypes[0]} to build an engine")  # fmt: skip
            echo(f"note: {note}")
    if as_json:
        emit_json({"manifest": str(manifest) if manifest else None, "graphs": graphs, "what": what, "dtype": dtype,
                   "seconds": round(time.time() - start, 3), "note": note})  # fmt: skip


def _export_device(device: str) -> None:
    """Export traces on the CPU (the graph does not depend on where it was traced): cuda is refused, not ignored."""
    from ditrt.cli.options import is_cuda_device, resolve_device
    from ditrt.contracts.errors import ConfigError

    if device in ("auto", "cpu"):
        return
    if not is_cuda_device(device):
        resolve_device(device)  # an invalid value gets the usual message
    raise ConfigError(f"ditrt export traces on the CPU only (the graph is the same wherever it is traced); drop --device {device}")


def _check_result(path: Path, violations) -> dict:
    return {"violations": [{"node": v.node, "rule": v.rule, "message": v.message} for v in violations], "passed": not violations}


@main.command()
@click.argument("onnx_path", type=click.Path(path_type=Path))
@json_option
def check(onnx_path, as_json):
    """onnx.checker plus TensorRT's strong-typing and Q/DQ rules; exit 1 on any violation."""
    from ditrt.export import check_onnx

    violations = check_onnx(onnx_path)
    if as_json:
        emit_json({"path": str(onnx_path), **_check_result(onnx_path, violations)})
        sys.exit(1 if violations else 0)
    for v in violations:
        click.echo(str(v))
    if violations:
        click.echo(f"{len(violations)} violation(s) in {onnx_path}", err=True)
        sys.exit(1)
    click.echo(f"{onnx_path}: no violations")
