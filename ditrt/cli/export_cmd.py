"""``ditrt export`` and ``ditrt check``."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from ditrt.cli import main
from ditrt.cli.options import model_option


@main.command()
@model_option
@click.option("--recipe", "recipe_dir", type=click.Path(path_type=Path), default=None, help="Recipe folder: export Q/DQ (w8a8, w4a16).")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="fp16: float16 weights and activations, LayerNorm in float32 (for TensorRT).")  # fmt: skip
@click.option("--opset", type=int, default=None, help="ONNX opset [default: 21].")
@click.option("--out", "out_path", required=True, type=click.Path(path_type=Path), help="The .onnx file to write.")
def export(model_spec, recipe_dir, dtype, opset, out_path):
    """Export a model (float, or quantized by a recipe) to ONNX with a dynamic batch."""
    from ditrt.contracts.files import state_dict_hash
    from ditrt.contracts.groups import group_graph_path
    from ditrt.contracts.recipe import check_recipe_matches, load_recipe
    from ditrt.export import check_onnx, export_onnx
    from ditrt.export.onnx_export import export_timestep_groups
    from ditrt.models.builtin import load_model

    model = load_model(model_spec)
    recipe = tensors = None
    if recipe_dir is not None:
        recipe, tensors = load_recipe(recipe_dir)
        check_recipe_matches(recipe, state_dict_hash(model), str(model_spec))
    start = time.time()
    what = f"{recipe.method} {recipe.precision}" if recipe else "float"
    if recipe is not None and recipe.act_bits and recipe.timestep_groups > 1:
        manifest = export_timestep_groups(model, out_path, recipe=recipe, tensors=tensors, dtype=dtype, opset=opset)
        paths = [group_graph_path(out_path, g) for g in range(recipe.timestep_groups)]
        click.echo(f"wrote {manifest} ({recipe.timestep_groups} timestep groups, edges {list(recipe.timestep_group_edges)}): "
                   "pass it as --onnx to sample with ONNX Runtime or to `ditrt build`")  # fmt: skip
    else:
        paths = [export_onnx(model, out_path, dtype=dtype, opset=opset, recipe=recipe, tensors=tensors)]
    for path in paths:
        violations = check_onnx(path)
        click.echo(f"wrote {path} ({what}, {dtype}, {path.stat().st_size / 1e6:.2f} MB, {time.time() - start:.1f} s); "
                   f"ditrt check: {'no violations' if not violations else f'{len(violations)} violations (run ditrt check)'}")  # fmt: skip
    if recipe is not None and recipe.precision == "w4a16" and dtype == "fp32":
        click.echo("note: a float32 w4a16 graph runs in ONNX Runtime; TensorRT runs INT4 weight-only GEMMs on float16 "
                   "activations only, so export with --dtype fp16 to build an engine")  # fmt: skip


@main.command()
@click.argument("onnx_path", type=click.Path(path_type=Path))
def check(onnx_path):
    """onnx.checker plus TensorRT's strong-typing and Q/DQ rules; exit 1 on any violation."""
    from ditrt.export import check_onnx

    violations = check_onnx(onnx_path)
    for v in violations:
        click.echo(str(v))
    if violations:
        click.echo(f"{len(violations)} violation(s) in {onnx_path}", err=True)
        sys.exit(1)
    click.echo(f"{onnx_path}: no violations")
