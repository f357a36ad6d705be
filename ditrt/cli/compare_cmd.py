"""``ditrt compare``: an exported graph (and engine) against torch or another graph, through Polygraphy."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import click

from ditrt.cli import main
from ditrt.cli.options import device_option, resolve_device
from ditrt.contracts.errors import ArtifactError, ConfigError


@main.command()
@click.option("--model", "model_spec", default=None,
              help="Float checkpoint ('builtin', .pt, .safetensors, diffusers folder): records the inputs and is the reference "
                   "unless --recipe or --reference-onnx says otherwise (default: builtin when nothing else names the model).")  # fmt: skip
@click.option("--recipe", "recipe_dir", type=click.Path(path_type=Path), default=None, help="Compare against the simulated recipe.")
@click.option("--onnx", "onnx_path", type=click.Path(path_type=Path), required=True, help="The graph under test (ONNX Runtime).")
@click.option("--reference-onnx", type=click.Path(path_type=Path), default=None, help="Compare against this graph instead of torch.")
@click.option("--engine", type=click.Path(path_type=Path), default=None, help="Also run this TensorRT engine against ONNX Runtime.")
@click.option("--per-layer", is_flag=True, help="Compare every intermediate tensor and name the first node where the error jumps.")
@click.option("--threshold", default=1e-2, show_default=True, type=float, help="Per-layer relative error that counts as a jump.")
@click.option("--atol", default=None, type=float,
              help="Absolute tolerance of Polygraphy's pass/fail check [default: the graph precision's parity tolerance].")
@click.option("--rtol", default=None, type=float,
              help="Relative tolerance of Polygraphy's pass/fail check [default: the graph precision's parity tolerance].")
@click.option("--error-stat", type=click.Choice(["elemwise", "mean"]), default=None,
              help="Judge every element, or the mean error (INT8 activation rounding) [default: the graph precision's].")
@click.option("--steps", default="50", show_default=True, help="Sampling run whose inputs are compared.")
@click.option("--timesteps", default=5, show_default=True, type=int, help="Recorded steps of that run.")
@click.option("--save-inputs", type=click.Path(path_type=Path), default=None, help="Write the inputs as a Polygraphy input file.")
@click.option("--load-inputs", type=click.Path(path_type=Path), default=None, help="Use a Polygraphy input file instead.")
@device_option
@click.option("--vae", "vae_dir", type=click.Path(path_type=Path), default=None,
              help="diffusers AutoencoderKL folder (latent models): also sample --images images with the reference and the graph "
                   "from the same seeds, decode both and compare the images (paired PSNR).")  # fmt: skip
@click.option("--images", default=4, show_default=True, type=click.IntRange(min=1),
              help="With --vae: images each model samples at --steps (guidance 1.5 where the model has a null class).")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout (Polygraphy's log goes to stderr).")
def compare(model_spec, recipe_dir, onnx_path, reference_onnx, engine, per_layer, threshold, atol, rtol, error_stat, steps, timesteps,
            save_inputs, load_inputs, device, vae_dir, images, as_json):  # fmt: skip
    """Accuracy of an exported graph (and engine) on real DiT inputs, through Polygraphy.

    Exit code 0 when every comparison passes Polygraphy's atol/rtol check, 1 when one fails, 2 on bad input. The
    check defaults to the parity tolerance the precision registry gives the graph's precision (W8A8: the mean
    error within 1e-2, since INT8 activation rounding flips cascade; exact graphs: every element within 1e-3)."""
    from ditrt.compare.accuracy import compare_runners
    from ditrt.compare.accuracy import per_layer as per_layer_compare
    from ditrt.compare.inputs import load_feeds, record_feeds, save_feeds
    from ditrt.compare.runners import DenoiserRunner
    from ditrt.runtime.onnxruntime_backend import make_session, onnxruntime_device
    from ditrt.runtime.open import open_denoiser

    _validate(onnx_path, reference_onnx, recipe_dir, engine, steps, timesteps, atol, rtol, threshold, load_inputs, save_inputs, vae_dir)
    device = resolve_device(device)
    graph_device = onnxruntime_device(device)
    if graph_device != device:
        click.echo(f"note: ONNX Runtime has no CUDA provider here (pip install onnxruntime-gpu): the graphs run on the CPU, torch on {device}",
                   err=True)  # fmt: skip
    test = open_denoiser(onnx_path, device=graph_device)
    atol, rtol, error_stat = _tolerance(test.precision, atol, rtol, error_stat)
    if reference_onnx is not None:
        reference, ref_name = open_denoiser(reference_onnx, device=graph_device), f"onnxruntime:{reference_onnx.name}"
    elif recipe_dir is not None:
        reference, ref_name = open_denoiser(recipe_dir, model=model_spec, device=device), "torch:simulated-recipe"
    else:
        reference, ref_name = open_denoiser(model_spec or "builtin", device=device), "torch:float"
    cfg = test.config
    if reference.config != cfg:
        raise ConfigError(f"{onnx_path} and the reference are different models ({_size(cfg)} vs {_size(reference.config)}); "
                          "pass the --model, --recipe or --reference-onnx it was exported from")  # fmt: skip
    if vae_dir is not None and cfg.in_channels != 4:
        raise ConfigError(f"--vae decodes 4-channel latents, but {onnx_path} makes {cfg.in_channels}-channel images; drop --vae")
    needs_float = not load_inputs or (per_layer and reference_onnx is None)
    float_model = _float_model(model_spec, reference, recipe_dir, device) if needs_float else None
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    pixel = cfg.pixel_space
    if load_inputs:
        feeds = load_feeds(load_inputs)
    else:
        feeds = record_feeds(float_model, steps=steps, timesteps=timesteps, pixel_space=pixel, device=_device_of(float_model))
    if save_inputs:
        save_feeds(feeds, save_inputs)
    test_runner = DenoiserRunner(test.denoiser, image_shape=shape, name=f"onnxruntime:{onnx_path.name}", device=test.device)
    reference_runner = DenoiserRunner(reference.denoiser, image_shape=shape, name=ref_name, device=reference.device)
    results = {"comparisons": [compare_runners(reference_runner, test_runner, feeds, atol=atol, rtol=rtol, error_stat=error_stat)]}
    if vae_dir is not None:
        results["images"] = _compare_images(reference, test, cfg, steps, images, vae_dir, device)
    if engine is not None:
        with open_denoiser(engine, onnx=onnx_path, device="cuda") as trt:
            trt_runner = DenoiserRunner(trt.denoiser, image_shape=shape, name=f"tensorrt:{engine.name}", device="cuda")
            results["comparisons"].append(compare_runners(test_runner, trt_runner, feeds, atol=atol, rtol=rtol, error_stat=error_stat))
    if per_layer:
        with tempfile.TemporaryDirectory() as tmp:
            ref_graph = reference_onnx or _folded_float_graph(float_model, recipe_dir, Path(tmp))
            results["per_layer"] = per_layer_compare(ref_graph, onnx_path, feeds, session_factory=make_session, threshold=threshold)
    results["passed"] = all(c["passed"] for c in results["comparisons"])  # the image comparison is a measurement, not a check
    if as_json:
        click.echo(json.dumps(results, indent=2))
    else:
        _print(results, atol, rtol, threshold)
    if not results["passed"]:
        sys.exit(1)  # a failed comparison is a result, not a usage error (2)


def _tolerance(precision, atol, rtol, error_stat) -> tuple[float, float, str]:
    """The given atol/rtol/error stat, each defaulting to the parity tolerance of ``precision`` in the registry."""
    from ditrt.contracts.precisions import EXACT, PRECISIONS

    tol = PRECISIONS[precision].parity if precision in PRECISIONS else EXACT
    return (tol.atol if atol is None else atol, tol.rtol if rtol is None else rtol, tol.error_stat if error_stat is None else error_stat)


def _validate(onnx_path, reference_onnx, recipe_dir, engine, steps, timesteps, atol, rtol, threshold, load_inputs, save_inputs, vae_dir) -> None:
    """Every option, before any model is loaded."""
    from ditrt.contracts.files import check_writable
    from ditrt.diffusion.schedule import make_schedule

    for flag, path in (("--onnx", onnx_path), ("--reference-onnx", reference_onnx), ("--engine", engine), ("--load-inputs", load_inputs)):
        if path is not None and not Path(path).exists():
            raise ArtifactError(f"{flag} {path} does not exist; create it with {'`ditrt build`' if flag == '--engine' else '`ditrt export`' if 'onnx' in flag else '--save-inputs'}")
    if reference_onnx is not None and recipe_dir is not None:
        raise ConfigError("--reference-onnx and --recipe are two references; pass one")
    if timesteps <= 0:
        raise ConfigError(f"--timesteps must be a positive number of recorded steps, got {timesteps}")
    schedule = make_schedule(str(steps))
    if not load_inputs and timesteps > schedule.num_steps:
        raise ConfigError(f"--timesteps {timesteps} is more than the {schedule.num_steps} steps of --steps {steps}; pass at most {schedule.num_steps}")
    for flag, v in (("--atol", atol), ("--rtol", rtol)):
        if v is not None and not v >= 0:
            raise ConfigError(f"{flag} must be >= 0, got {v}")
    if not threshold > 0:
        raise ConfigError(f"--threshold must be > 0, got {threshold}")
    if save_inputs is not None:
        check_writable(save_inputs, what="--save-inputs")
    if vae_dir is not None and not (Path(vae_dir) / "config.json").is_file():
        raise ConfigError(f"--vae {vae_dir} is not a diffusers AutoencoderKL folder (no config.json); pass e.g. a local sd-vae-ft-ema copy")


def _device_of(model) -> str:
    """Where a recording model computes: an OpenDenoiser says so, a torch module by its parameters."""
    if hasattr(model, "device") and not hasattr(model, "parameters"):
        return str(model.device)
    return str(next(model.parameters()).device)


def _compare_images(reference, test, cfg, steps: str, images: int, vae_dir: Path, device: str) -> dict:
    """Both models sample ``images`` images from the same seeds and labels; decoded, they are compared as images."""
    import torch

    from ditrt.diffusion.sample_set import default_labels, generate
    from ditrt.diffusion.sampler import SamplerConfig
    from ditrt.quality.metrics import paired_psnr, relative_error
    from ditrt.runtime.vae import load_vae

    cfg_scale = 1.5 if cfg.has_null_class else 1.0
    sampler = SamplerConfig(steps=str(steps), cfg_scale=cfg_scale)
    labels, seeds = default_labels(images, cfg.num_classes), list(range(images))
    out = {}
    for name, opened in (("reference", reference), ("test", test)):
        batch = min(images, opened.images_per_call(guided=cfg_scale != 1.0) or images)
        out[name] = generate(opened.denoiser, sampler, labels, seeds, num_classes=cfg.num_classes, device=opened.device, batch_size=batch,
                             image_shape=(cfg.in_channels, cfg.input_size, cfg.input_size), progress=True)  # fmt: skip
    decode = load_vae(vae_dir, device)
    decoded = {name: decode(z) for name, z in out.items()}
    return {"images": images, "steps": str(steps), "cfg_scale": cfg_scale, "vae": str(vae_dir),
            "psnr_db": paired_psnr(decoded["reference"], decoded["test"]),
            "latent_rel_l2": relative_error(torch.from_numpy(out["reference"]), torch.from_numpy(out["test"]))}  # fmt: skip


def _float_model(model_spec, reference, recipe_dir, device: str = "cpu"):
    """What records the inputs (a float sampling run, on ``device`` where it is torch): --model, else the recipe's
    folded float model, else the reference itself (the float checkpoint, or the reference graph: an OpenDenoiser has a config)."""
    from ditrt.runtime.open import open_denoiser

    if model_spec is not None:
        return reference.model if reference.backend == "torch" and recipe_dir is None else open_denoiser(model_spec, device=device).model
    if recipe_dir is not None:
        from ditrt.contracts.model_config import DiTConfig
        from ditrt.contracts.recipe import load_recipe
        from ditrt.export.qdq import folded_model
        from ditrt.models.dit import DiT

        recipe, tensors = load_recipe(recipe_dir)
        return folded_model(DiT(DiTConfig.from_dict(recipe.model_config)), tensors).to(device)  # computes what the float model computes
    return reference.model if reference.backend == "torch" else reference


def _size(c) -> str:
    return f"{c.in_channels} ch, {c.input_size}px, hidden {c.hidden_size}, depth {c.depth}"


def _print(results: dict, atol: float, rtol: float, threshold: float) -> None:
    click.echo(f"{'reference':32} {'test':32} {'rel L2':>9} {'max abs':>9} {'mean abs':>9} {'cosine':>9} {'SNR dB':>7}  polygraphy")
    for c in results["comparisons"]:
        for name, s in c["outputs"].items():
            click.echo(f"{c['reference'][:32]:32} {c['test'][:32]:32} {s['rel_l2']:9.2e} {s['max_abs']:9.2e} {s['mean_abs']:9.2e} "
                       f"{s['cosine']:9.6f} {s['snr_db']:7.1f}  {'PASSED' if c['passed'] else 'FAILED'} ({c['error_stat']} within atol {atol}, rtol {rtol})")  # fmt: skip
    if "images" in results:
        i = results["images"]
        click.echo(f"decoded images ({i['images']} per model, {i['steps']} steps, cfg {i['cfg_scale']}): paired PSNR {i['psnr_db']:.2f} dB; "
                   f"latent relative L2 {i['latent_rel_l2']:.4f}")  # fmt: skip
    if "per_layer" in results:
        p = results["per_layer"]
        first = p["first_over_threshold"]
        click.echo(f"per-layer: {p['compared_tensors']} tensors compared; final rel L2 {p['final_rel_l2']:.2e}")
        click.echo(f"first node over {threshold:g}: " + (f"{first['node']} ({first['op']}) rel L2 {first['rel_l2']:.2e}" if first else "none"))
        for r in p["largest_growth"]:
            click.echo(f"  error grows most at {r['node']} ({r['op']}): {r['rel_l2']:.2e} (+{r['growth']:.2e})")


def _folded_float_graph(model, recipe_dir, tmp: Path) -> Path:
    """The float graph (recipe's folded weights, no Q/DQ) that a quantized graph is compared with layer by layer."""
    from ditrt.contracts.recipe import load_recipe
    from ditrt.export import export_onnx
    from ditrt.export.qdq import folded_model

    if recipe_dir is None:
        raise ConfigError("--per-layer needs a second graph: pass --reference-onnx, or --recipe to export its float graph")
    _, tensors = load_recipe(recipe_dir)
    return export_onnx(folded_model(model.cpu(), tensors), tmp / "folded-float.onnx", dtype="fp32")
