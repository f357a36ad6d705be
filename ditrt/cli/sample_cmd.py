"""``ditrt sample``."""

from __future__ import annotations

import logging
from pathlib import Path

import click
import numpy as np

from ditrt.cli import main
from ditrt.cli.options import device_option, model_option, parse_classes, resolve_device

log = logging.getLogger(__name__)


@main.command()
@model_option
@click.option("--config", "config_name", default=None, help="Named DiT config, when the checkpoint does not say (e.g. DiT-XL/2).")
@click.option("--recipe", "recipe_dir", type=click.Path(path_type=Path), default=None,
              help="Recipe folder from `ditrt calibrate`: sample the simulated quantized model.")  # fmt: skip
@click.option("--onnx", "onnx_path", type=click.Path(path_type=Path), default=None, help="Exported graph, or the .groups.json of a timestep-grouped export (ONNX Runtime backend).")
@click.option("--engine", "engine_path", type=click.Path(path_type=Path), default=None, help="TensorRT engine, or the .groups.json of engines built from a timestep-grouped export (TensorRT backend).")
@click.option("--backend", type=click.Choice(["auto", "torch", "onnxruntime", "tensorrt"]), default="auto", show_default=True,
              help="auto: tensorrt with --engine, onnxruntime with --onnx, else torch.")  # fmt: skip
@click.option("--steps", default="250", show_default=True, help="Sampling steps: 250, 100, 50 (DDPM) or ddim50 (DDIM).")
@click.option("--cfg-scale", default=1.5, show_default=True, type=float, help="Classifier-free guidance scale (1 = off).")
@click.option("--guidance", type=click.Choice(["official", "all"]), default="official", show_default=True,
              help="official: guide the first 3 noise channels as the DiT code does; all: every noise channel.")  # fmt: skip
@click.option("--num", default=16, show_default=True, type=int, help="Number of samples.")
@click.option("--classes", default=None, help="Comma-separated class ids to cycle through (default: all).")
@click.option("--seed", default=0, show_default=True, type=int, help="Sample i uses seed + i.")
@click.option("--batch-size", default=256, show_default=True, type=int)
@device_option
@click.option("--vae", "vae_dir", type=click.Path(path_type=Path), default=None, help="diffusers AutoencoderKL folder to decode latents.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Output folder.")
def sample(model_spec, config_name, recipe_dir, onnx_path, engine_path, backend, steps, cfg_scale, guidance, num, classes, seed, batch_size, device, vae_dir, out_dir):
    """Sample images: writes OUT/samples.png (a grid, one row per class) and OUT/samples.npz."""
    from ditrt.diffusion.sample_set import SampleSet, default_labels, generate
    from ditrt.diffusion.sampler import SamplerConfig
    from ditrt.models.builtin import is_pixel_model, load_model
    from ditrt.quality.images import sample_grid, save_png
    device = resolve_device(device)
    model = load_model(model_spec) if config_name is None else _load_with_config(model_spec, config_name)
    cfg = model.config
    pixel = is_pixel_model(model)
    if recipe_dir is not None:
        from ditrt.models.quantized import load_quantized

        model, recipe = load_quantized(recipe_dir, model, model_source=str(model_spec))
    sampler = SamplerConfig(steps=str(steps), cfg_scale=cfg_scale, guidance=guidance, clip_denoised=pixel)
    labels = default_labels(num, cfg.num_classes, parse_classes(classes))
    seeds = [seed + i for i in range(num)]
    backend = backend if backend != "auto" else "tensorrt" if engine_path else "onnxruntime" if onnx_path else "torch"
    denoiser = _denoiser(backend, model, onnx_path, engine_path, device)
    data = generate(
        denoiser, sampler, labels, seeds, num_classes=cfg.num_classes,
        image_shape=(cfg.in_channels, cfg.input_size, cfg.input_size), device=device, batch_size=batch_size, progress=True,
    )  # fmt: skip
    settings = {"model": str(model_spec), "recipe": str(recipe_dir) if recipe_dir else None, "backend": backend, "sampler": sampler.to_dict(), "model_config": cfg.to_dict()}
    kind = "images" if pixel else "latents"
    if not pixel and vae_dir is not None:
        from ditrt.runtime.vae import decode_latents

        data, kind = decode_latents(data, vae_dir, device=device), "images"
        settings["vae"] = str(vae_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    SampleSet(data, np.asarray(labels), np.asarray(seeds), kind, settings).save(out_dir / "samples.npz")
    if kind == "images":
        save_png(sample_grid(data, labels, title=f"{model_spec} | {steps} steps | cfg {cfg_scale}"), out_dir / "samples.png")
        click.echo(f"wrote {out_dir / 'samples.png'} and {out_dir / 'samples.npz'}")
    else:
        click.echo(f"wrote latents to {out_dir / 'samples.npz'} (no image: pass --vae DIR with a diffusers AutoencoderKL to decode)")


def _denoiser(backend: str, model, onnx_path, engine_path, device: str):
    """The model behind the sampler: torch (float or simulated recipe), an ONNX graph, an engine."""
    from ditrt.contracts.errors import ConfigError

    if backend == "torch":
        if onnx_path or engine_path:
            raise ConfigError("--backend torch samples the checkpoint (and --recipe); drop --onnx/--engine or pick their backend")
        from ditrt.runtime.torch_backend import TorchDenoiser

        return TorchDenoiser(model, device=device)
    if backend == "onnxruntime":
        if onnx_path is None:
            raise ConfigError("--backend onnxruntime needs --onnx M.onnx (create it with `ditrt export`)")
        from ditrt.contracts.groups import is_group_manifest
        from ditrt.runtime.groups import TimestepGroupDenoiser
        from ditrt.runtime.onnxruntime_backend import OnnxRuntimeDenoiser

        providers = ["CUDAExecutionProvider"] if device.startswith("cuda") else None
        if is_group_manifest(onnx_path):  # one graph per timestep group of activation scales
            return TimestepGroupDenoiser.from_manifest(onnx_path, lambda g: OnnxRuntimeDenoiser(g, providers=providers))
        return OnnxRuntimeDenoiser(onnx_path, providers=providers)
    if engine_path is None:
        raise ConfigError("--backend tensorrt needs --engine M.plan (create it with `ditrt build`)")
    from ditrt.contracts.groups import is_group_manifest, read_manifest
    from ditrt.runtime.tensorrt_backend import TensorRTDenoiser

    if is_group_manifest(engine_path):  # one engine per timestep group of activation scales
        from ditrt.runtime.groups import TimestepGroupDenoiser

        edges, engines = read_manifest(engine_path, "tensorrt")
        graphs = read_manifest(onnx_path, "onnx")[1] if onnx_path else [None] * len(engines)  # checked against their graphs
        if len(graphs) != len(engines):
            raise ConfigError(f"{onnx_path} and {engine_path} list different numbers of timestep groups; rebuild with `ditrt build`")
        return TimestepGroupDenoiser([TensorRTDenoiser(e, device=device, onnx_path=g) for e, g in zip(engines, graphs)], edges)
    return TensorRTDenoiser(engine_path, device=device, onnx_path=onnx_path)


def _load_with_config(spec, name):
    from ditrt.models.checkpoints import load_dit

    return load_dit(spec, config=name)
