"""``ditrt compare``: an exported graph (and engine) against torch or another graph, through Polygraphy."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import click

from ditrt.cli import main
from ditrt.cli.options import model_option


@main.command()
@model_option
@click.option("--recipe", "recipe_dir", type=click.Path(path_type=Path), default=None, help="Compare against the simulated recipe.")
@click.option("--onnx", "onnx_path", type=click.Path(path_type=Path), required=True, help="The graph under test (ONNX Runtime).")
@click.option("--reference-onnx", type=click.Path(path_type=Path), default=None, help="Compare against this graph instead of torch.")
@click.option("--engine", type=click.Path(path_type=Path), default=None, help="Also run this TensorRT engine against ONNX Runtime.")
@click.option("--per-layer", is_flag=True, help="Compare every intermediate tensor and name the first node where the error jumps.")
@click.option("--threshold", default=1e-2, show_default=True, type=float, help="Per-layer relative error that counts as a jump.")
@click.option("--atol", default=1e-3, show_default=True, type=float)
@click.option("--rtol", default=1e-3, show_default=True, type=float)
@click.option("--steps", default="50", show_default=True, help="Sampling run whose inputs are compared.")
@click.option("--timesteps", default=5, show_default=True, type=int, help="Recorded steps of that run.")
@click.option("--save-inputs", type=click.Path(path_type=Path), default=None, help="Write the inputs as a Polygraphy input file.")
@click.option("--load-inputs", type=click.Path(path_type=Path), default=None, help="Use a Polygraphy input file instead.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def compare(model_spec, recipe_dir, onnx_path, reference_onnx, engine, per_layer, threshold, atol, rtol, steps, timesteps,
            save_inputs, load_inputs, as_json):  # fmt: skip
    """Accuracy of an exported graph (and engine) on real DiT inputs, through Polygraphy."""
    from ditrt.compare.accuracy import compare_runners
    from ditrt.compare.accuracy import per_layer as per_layer_compare
    from ditrt.compare.inputs import load_feeds, record_feeds, save_feeds
    from ditrt.compare.runners import DenoiserRunner
    from ditrt.contracts.errors import ArtifactError
    from ditrt.models.builtin import is_pixel_model, load_model
    from ditrt.runtime.onnxruntime_backend import OnnxRuntimeDenoiser, make_session

    if not onnx_path.exists():
        raise ArtifactError(f"{onnx_path} does not exist; create it with `ditrt export`")
    model = load_model(model_spec)
    shape = (model.config.in_channels, model.config.input_size, model.config.input_size)
    feeds = load_feeds(load_inputs) if load_inputs else record_feeds(model, steps=steps, timesteps=timesteps, pixel_space=is_pixel_model(model))
    if save_inputs:
        save_feeds(feeds, save_inputs)
    test = DenoiserRunner(OnnxRuntimeDenoiser(onnx_path), image_shape=shape, name=f"onnxruntime:{onnx_path.name}")
    if reference_onnx is not None:
        reference = DenoiserRunner(OnnxRuntimeDenoiser(reference_onnx), image_shape=shape, name=f"onnxruntime:{reference_onnx.name}")
    elif recipe_dir is not None:
        from ditrt.models.quantized import load_quantized

        sim, _ = load_quantized(recipe_dir, model, model_source=str(model_spec))
        reference = DenoiserRunner(sim, image_shape=shape, name="torch:simulated-recipe")
    else:
        reference = DenoiserRunner(model, image_shape=shape, name="torch:float")
    results = {"comparisons": [compare_runners(reference, test, feeds, atol=atol, rtol=rtol)]}
    if engine is not None:
        from ditrt.runtime.tensorrt_backend import TensorRTDenoiser

        trt = DenoiserRunner(TensorRTDenoiser(engine, onnx_path=onnx_path), image_shape=shape, name=f"tensorrt:{engine.name}", device="cuda")
        results["comparisons"].append(compare_runners(test, trt, feeds, atol=atol, rtol=rtol))
    if per_layer:
        with tempfile.TemporaryDirectory() as tmp:
            ref_graph = reference_onnx or _folded_float_graph(model, recipe_dir, Path(tmp))
            results["per_layer"] = per_layer_compare(ref_graph, onnx_path, feeds, session_factory=make_session, threshold=threshold)
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    click.echo(f"{'reference':32} {'test':32} {'rel L2':>9} {'max abs':>9} {'mean abs':>9} {'cosine':>9} {'SNR dB':>7}  polygraphy")
    for c in results["comparisons"]:
        for name, s in c["outputs"].items():
            click.echo(f"{c['reference'][:32]:32} {c['test'][:32]:32} {s['rel_l2']:9.2e} {s['max_abs']:9.2e} {s['mean_abs']:9.2e} "
                       f"{s['cosine']:9.6f} {s['snr_db']:7.1f}  {'PASSED' if c['passed'] else 'FAILED'} (atol {atol}, rtol {rtol})")  # fmt: skip
    if per_layer:
        p = results["per_layer"]
        first = p["first_over_threshold"]
        click.echo(f"per-layer: {p['compared_tensors']} tensors compared; final rel L2 {p['final_rel_l2']:.2e}")
        click.echo(f"first node over {threshold:g}: " + (f"{first['node']} ({first['op']}) rel L2 {first['rel_l2']:.2e}" if first else "none"))
        for r in p["largest_growth"]:
            click.echo(f"  error grows most at {r['node']} ({r['op']}): {r['rel_l2']:.2e} (+{r['growth']:.2e})")


def _folded_float_graph(model, recipe_dir, tmp: Path) -> Path:
    from ditrt.contracts.errors import ConfigError
    from ditrt.export import export_onnx

    if recipe_dir is None:
        raise ConfigError("--per-layer needs a second graph: pass --reference-onnx, or --recipe to export its float graph")
    from ditrt.contracts.files import state_dict_hash
    from ditrt.contracts.recipe import check_recipe_matches, load_recipe
    from ditrt.export.qdq import folded_model

    recipe, tensors = load_recipe(recipe_dir)
    check_recipe_matches(recipe, state_dict_hash(model), "--model")
    return export_onnx(folded_model(model, tensors), tmp / "folded-float.onnx", dtype="fp32")
