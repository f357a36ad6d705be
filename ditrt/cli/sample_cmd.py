"""``ditrt sample [ARTIFACT]``: sample whatever artifact is given; the artifact picks the backend."""

from __future__ import annotations

import logging
from pathlib import Path

import click
import numpy as np

from ditrt.cli import main
from ditrt.cli.options import checkpoint_options, device_option, parse_classes, resolve_device
from ditrt.contracts.errors import ConfigError

log = logging.getLogger(__name__)

#: the backend each artifact option stands for, and what it takes
_FLAG_BACKENDS = {"--recipe": ("torch", "a recipe folder from `ditrt calibrate`"), "--onnx": ("onnxruntime", "an .onnx graph or its .groups.json"),
                  "--engine": ("tensorrt", "a .plan/.engine or an engine .groups.json")}  # fmt: skip
_MANIFEST_KIND = {"onnxruntime": "onnx", "tensorrt": "tensorrt"}
DEFAULT_BATCH = 256


@main.command()
@click.argument("artifact", required=False, type=click.Path(path_type=Path))
@click.option("--model", "model_spec", default=None,
              help="A checkpoint ('builtin', official .pt, .safetensors, diffusers folder): sampled as the float model, or the model "
                   "a --recipe is checked against. Default: builtin when no artifact is given.")  # fmt: skip
@checkpoint_options
@click.option("--recipe", "recipe_dir", type=click.Path(path_type=Path), default=None,
              help="Recipe folder from `ditrt calibrate`: sample the simulated quantized model (same as ARTIFACT).")  # fmt: skip
@click.option("--onnx", "onnx_path", type=click.Path(path_type=Path), default=None,
              help="Exported graph or graph .groups.json (ONNX Runtime); beside --engine: the graph the engine is checked against.")  # fmt: skip
@click.option("--engine", "engine_path", type=click.Path(path_type=Path), default=None,
              help="TensorRT engine or engine .groups.json (same as ARTIFACT).")  # fmt: skip
@click.option("--backend", type=click.Choice(["auto", "torch", "onnxruntime", "tensorrt"]), default="auto", show_default=True,
              help="Kept for old scripts: the artifact decides; a value that disagrees with it is an error.")  # fmt: skip
@click.option("--steps", default="250", show_default=True, help="Sampling steps: 250, 100, 50 (DDPM) or ddim50 (DDIM).")
@click.option("--cfg-scale", default=1.5, show_default=True, type=float, help="Classifier-free guidance scale (1 = off).")
@click.option("--guidance", type=click.Choice(["official", "all"]), default="official", show_default=True,
              help="official: guide the first 3 noise channels as the DiT code does; all: every noise channel.")  # fmt: skip
@click.option("--num", default=16, show_default=True, type=int, help="Number of samples.")
@click.option("--classes", default=None, help="Comma-separated class ids to cycle through (default: all).")
@click.option("--seed", default=0, show_default=True, type=int, help="Sample i uses seed + i.")
@click.option("--batch-size", default=None, type=int,
              help=f"Images per sampler call (default: the most an engine allows, else {DEFAULT_BATCH}).")  # fmt: skip
@device_option
@click.option("--vae", "vae_dir", type=click.Path(path_type=Path), default=None,
              help="diffusers AutoencoderKL folder to decode latents (latent models only).")  # fmt: skip
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Output folder.")
def sample(artifact, model_spec, config_name, num_classes, num_heads, recipe_dir, onnx_path, engine_path, backend, steps, cfg_scale, guidance, num, classes,
           seed, batch_size, device, vae_dir, out_dir):  # fmt: skip
    """Sample ARTIFACT (a recipe folder, an .onnx, a .plan, a .groups.json or a checkpoint; default: --model, else the
    built-in model): writes OUT/samples.png (a grid, one row per class) and OUT/samples.npz."""
    from ditrt.contracts.files import check_writable
    from ditrt.diffusion.sampler import SamplerConfig
    from ditrt.runtime.open import open_denoiser

    target, model, check_graph = _artifact(artifact, model_spec, recipe_dir, onnx_path, engine_path)
    chosen = _backend(target)
    if backend != "auto" and backend != chosen:
        raise ConfigError(f"--backend {backend} disagrees with {target}, which runs on {chosen}; drop --backend (the artifact decides)")
    if num <= 0:
        raise ConfigError(f"--num must be positive, got {num}")
    if batch_size is not None and batch_size <= 0:
        raise ConfigError(f"--batch-size must be a positive number of images, got {batch_size}; omit it for the backend's default")
    wanted = parse_classes(classes)
    if vae_dir is not None and not (Path(vae_dir) / "config.json").is_file():
        raise ConfigError(f"--vae {vae_dir} is not a diffusers AutoencoderKL folder (no config.json); pass e.g. a local sd-vae-ft-ema copy")
    SamplerConfig(steps=str(steps), cfg_scale=cfg_scale, guidance=guidance)  # validates --steps, --cfg-scale before any loading
    check_writable(out_dir, what="--out", folder=True)
    device = _device(device, chosen)
    with open_denoiser(target, model=model, onnx=check_graph, device=device, config_name=config_name,
                       num_classes=num_classes, num_heads=num_heads) as opened:
        _sample_opened(opened, steps, cfg_scale, guidance, num, wanted, seed, batch_size, device, vae_dir, out_dir,
                       model=model, check_graph=check_graph)  # fmt: skip


def _sample_opened(opened, steps, cfg_scale, guidance, num, wanted, seed, batch_size, device, vae_dir, out_dir, *, model, check_graph):
    from ditrt.contracts.files import output_folder
    from ditrt.diffusion.sample_set import SampleSet, default_labels, generate
    from ditrt.diffusion.sampler import SamplerConfig
    from ditrt.quality.images import sample_grid, save_png

    cfg = opened.config
    pixel = cfg.pixel_space
    if vae_dir is not None and cfg.in_channels != 4:
        raise ConfigError(f"--vae decodes 4-channel latents, but {opened.source} makes {cfg.in_channels}-channel images; drop --vae")
    cfg.check_guidance(cfg_scale, opened.source)
    sampler = SamplerConfig(steps=str(steps), cfg_scale=cfg_scale, guidance=guidance, clip_denoised=pixel)
    labels = default_labels(num, cfg.num_classes, wanted)
    limit = opened.images_per_call(guided=cfg_scale != 1.0)
    if batch_size is None:
        batch_size = limit or DEFAULT_BATCH
    elif limit is not None and batch_size > limit:
        raise ConfigError(
            f"--batch-size {batch_size} is more than {opened.source} takes: at most {limit} images per call"
            f"{' with guidance' if cfg_scale != 1.0 else ''} ({opened.max_rows} rows); pass --batch-size {limit} or rebuild with a larger `ditrt build --batch`"
        )
    seeds = [seed + i for i in range(num)]
    data = generate(
        opened.denoiser, sampler, labels, seeds, num_classes=cfg.num_classes,
        image_shape=(cfg.in_channels, cfg.input_size, cfg.input_size), device=device, batch_size=batch_size, progress=True,
    )  # fmt: skip
    settings = {
        "artifact": opened.source, "backend": opened.backend, "precision": opened.precision,
        "model": str(model) if model is not None else (opened.source if opened.backend == "torch" and not _is_recipe(opened.source) else None),
        "recipe": opened.source if _is_recipe(opened.source) else None, "onnx": str(check_graph) if check_graph else None,
        "sampler": sampler.to_dict(), "model_config": cfg.to_dict(),
    }  # fmt: skip
    kind = "images" if pixel else "latents"
    if vae_dir is not None:
        from ditrt.runtime.vae import decode_latents

        data, kind = decode_latents(data, vae_dir, device=device), "images"
        settings["vae"] = str(vae_dir)
    with output_folder(out_dir):  # samples.npz and samples.png, or neither (also on Ctrl-C)
        SampleSet(data, np.asarray(labels), np.asarray(seeds), kind, settings).save(out_dir / "samples.npz")
        if kind == "images":
            title = f"{Path(opened.source).name} | {opened.backend} | {steps} steps | cfg {cfg_scale}"
            save_png(sample_grid(data, labels, title=title), out_dir / "samples.png")
    if kind == "images":
        click.echo(f"wrote {out_dir / 'samples.png'} and {out_dir / 'samples.npz'}")
    else:
        click.echo(f"wrote latents to {out_dir / 'samples.npz'} (no image: pass --vae DIR with a diffusers AutoencoderKL to decode)")


def _is_recipe(source: str) -> bool:
    from ditrt.runtime.open import is_recipe_folder

    return is_recipe_folder(source)


def _backend(path) -> str:
    from ditrt.runtime.open import artifact_backend

    return artifact_backend(path)


def _artifact(artifact, model_spec, recipe_dir, onnx_path, engine_path):
    """``(what to sample, --model to check a recipe against, graph to check an engine against)``; exactly one artifact."""
    given = {flag: p for flag, p in (("--recipe", recipe_dir), ("--engine", engine_path), ("--onnx", onnx_path)) if p is not None}
    for flag, path in given.items():
        _expect(path, flag)
    if recipe_dir is not None and (onnx_path or engine_path or (artifact and _backend(artifact) != "torch")):
        raise ConfigError("--recipe does not apply to an ONNX graph or engine: the graph already carries the recipe it was exported with; drop --recipe")
    check_graph = None
    if onnx_path is not None and (engine_path is not None or (artifact is not None and _backend(artifact) == "tensorrt")):
        check_graph = given.pop("--onnx")  # the graph the engine is checked against, not a second artifact
    if artifact is not None:
        given = {"ARTIFACT": artifact, **given}
    if len(given) > 1:
        raise ConfigError(f"sample one artifact at a time: got {' and '.join(given)}; pass only one of ARTIFACT, --recipe, --onnx, --engine")
    if not given:  # the float checkpoint itself
        return model_spec or "builtin", None, None
    target = next(iter(given.values()))
    if model_spec is not None and _backend(target) != "torch":
        raise ConfigError(f"--model does not apply to {target}: a graph or engine records its own model; drop --model")
    if model_spec is not None and not _is_recipe(target):
        raise ConfigError(f"--model is the checkpoint a --recipe is checked against; to sample {model_spec}, pass it alone")
    return target, model_spec, check_graph


def _expect(path, flag: str) -> None:
    """Refuse an artifact given under the wrong option (a graph manifest as --engine, a folder as --onnx, ...)."""
    backend, what = _FLAG_BACKENDS[flag]
    if flag == "--recipe":
        if not _is_recipe(path):
            raise ConfigError(f"--recipe {path} is not a recipe folder (needs recipe.json); create it with `ditrt calibrate`")
        return
    from ditrt.contracts.groups import is_group_manifest, read_manifest

    if is_group_manifest(path):
        read_manifest(path, _MANIFEST_KIND[backend])  # a manifest of the other kind: says what to pass or build
    elif _backend(path) != backend:
        raise ConfigError(f"{flag} {path} is not {what}; pass it as ARTIFACT and the artifact picks its backend")


def _device(device: str, backend: str) -> str:
    """--device auto: the GPU where the backend can use it (ONNX Runtime only with its CUDA provider)."""
    if device == "auto" and backend == "onnxruntime":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return "cpu"
    return resolve_device(device)
