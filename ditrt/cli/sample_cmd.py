"""``ditrt sample [ARTIFACT]``: sample whatever artifact is given; the artifact picks the backend."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import click

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
@click.option("--num", "--num-samples", "num", default=16, show_default=True, type=int,
              help="Number of samples. Under torchrun spell it --num-samples: torchrun's own parser takes --num for its --numa-binding.")  # fmt: skip
@click.option("--classes", default=None, help="Comma-separated class ids to cycle through (default: all).")
@click.option("--seed", default=0, show_default=True, type=int, help="Sample i uses seed + i.")
@click.option("--batch-size", default=None, type=int,
              help=f"Images per sampler call (default: the most an engine allows, else {DEFAULT_BATCH}).")  # fmt: skip
@device_option
@click.option("--vae", "vae_dir", type=click.Path(path_type=Path), default=None,
              help="diffusers AutoencoderKL folder to decode latents (latent models only).")  # fmt: skip
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--adm-npz", is_flag=True,
              help="Also write OUT/adm_samples.npz for the ADM evaluator (guided-diffusion evaluator.py): arr_0 (N, H, W, 3) "
                   "uint8 as DiT's sample_ddp.py converts, arr_1 the labels. Needs RGB images (a latent model needs --vae).")  # fmt: skip
@click.option("--overwrite", is_flag=True,
              help="Discard the shards and results of an earlier run in --out and sample from scratch (default: resume it).")  # fmt: skip
@click.option("--keep-shards", is_flag=True,
              help="Keep OUT/shards after merging (a later run with a larger --num reuses them).")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (the files, the counts) on stdout.")
def sample(artifact, model_spec, config_name, num_classes, num_heads, recipe_dir, onnx_path, engine_path, backend, steps, cfg_scale, guidance, num, classes,
           seed, batch_size, device, vae_dir, out_dir, adm_npz, overwrite, keep_shards, as_json):  # fmt: skip
    """Sample ARTIFACT (a recipe folder, an .onnx, a .plan, a .groups.json or a checkpoint; default: --model, else the
    built-in model): writes OUT/samples.png (a grid, one row per class, of the first samples) and OUT/samples.npz.

    Samples are drawn in chunks of --batch-size, one shard file each (OUT/shards), merged at the end:
    re-running the same command resumes a killed run, and `torchrun --nproc_per_node N -m ditrt sample ...`
    shares the chunks among N processes (one GPU each) with the same result as one process."""
    from ditrt.contracts.files import check_writable
    from ditrt.diffusion.sampler import SamplerConfig
    from ditrt.distributed import launched, process_group
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
    if launched() and device.startswith("cuda:"):
        raise ConfigError(f"--device {device} would put every torchrun process on one GPU; pass --device cuda (process i takes cuda:LOCAL_RANK)")
    with process_group(device) as world:
        rank_device = world.device(device)
        with open_denoiser(target, model=model, onnx=check_graph, device=rank_device, config_name=config_name,
                           num_classes=num_classes, num_heads=num_heads) as opened:
            opts = _Options(steps, cfg_scale, guidance, num, wanted, seed, batch_size, vae_dir, out_dir, adm_npz, overwrite,
                            keep_shards, as_json)  # fmt: skip
            _sample_opened(opened, opts, world, rank_device, model=model, check_graph=check_graph)


@dataclass(frozen=True)
class _Options:
    """The sampling options of one `ditrt sample` call."""

    steps: str
    cfg_scale: float
    guidance: str
    num: int
    classes: list | None
    seed: int
    batch_size: int | None
    vae_dir: Path | None
    out_dir: Path
    adm_npz: bool
    overwrite: bool
    keep_shards: bool
    as_json: bool


def _sample_opened(opened, o: _Options, world, asked: str, *, model, check_graph):
    """Sample on ``opened.device`` (where the backend computes, which may differ from the ``asked``
    --device: ONNX Runtime without its CUDA provider computes on the CPU); decode on ``asked``."""
    from ditrt.diffusion.sample_set import default_labels
    from ditrt.diffusion.sampler import SamplerConfig
    from ditrt.diffusion.schedule import make_schedule
    from ditrt.diffusion.shards import ShardPlan, sample_shards

    cfg = opened.config
    pixel = cfg.pixel_space
    if o.vae_dir is not None and cfg.in_channels != 4:
        raise ConfigError(f"--vae decodes 4-channel latents, but {opened.source} makes {cfg.in_channels}-channel images; drop --vae")
    kind = "images" if pixel or o.vae_dir is not None else "latents"
    if o.adm_npz and kind != "images":
        raise ConfigError(f"--adm-npz needs images, but {opened.source} makes latents; pass --vae DIR (a diffusers AutoencoderKL) to decode them")
    if o.adm_npz and pixel and cfg.in_channels != 3:
        raise ConfigError(f"--adm-npz writes RGB images for the ADM evaluator, but {opened.source} makes {cfg.in_channels}-channel images; drop --adm-npz")
    cfg.check_guidance(o.cfg_scale, opened.source)
    sampler = SamplerConfig(steps=str(o.steps), cfg_scale=o.cfg_scale, guidance=o.guidance, clip_denoised=pixel)
    labels = default_labels(o.num, cfg.num_classes, o.classes)
    plan = ShardPlan(o.out_dir, o.num, _batch_size(opened, o))
    _check_rows(opened, plan, o)
    device = world.device(opened.device)  # where each step's tensors live: no copy to and from the backend
    if world.is_main and device.split(":")[0] != asked.split(":")[0]:
        log.warning("%s computes on %s, not on the asked %s: sampling there", opened.source, device, asked)
    seeds = [o.seed + i for i in range(o.num)]
    settings = {
        "artifact": opened.source, "backend": opened.backend, "precision": opened.precision,
        "model": str(model) if model is not None else (opened.source if opened.backend == "torch" and not _is_recipe(opened.source) else None),
        "recipe": opened.source if _is_recipe(opened.source) else None, "onnx": str(check_graph) if check_graph else None,
        "sampler": sampler.to_dict(), "model_config": cfg.to_dict(),
    }  # fmt: skip
    if o.vae_dir is not None:
        settings["vae"] = str(o.vae_dir)
    run = _run_identity(opened, model, check_graph, o, sampler, cfg, device, asked)
    decode = None
    if o.vae_dir is not None:  # loaded once per process, before any sampling
        from ditrt.runtime.vae import load_vae

        decode = load_vae(o.vae_dir, asked)

    def draw(chunk_labels, chunk_seeds, on_step):
        from ditrt.diffusion.sample_set import generate

        data = generate(
            opened.denoiser, sampler, chunk_labels, chunk_seeds, num_classes=cfg.num_classes,
            image_shape=(cfg.in_channels, cfg.input_size, cfg.input_size), device=device, batch_size=len(chunk_labels), on_step=on_step,
        )  # fmt: skip
        return data if decode is None else decode(data)

    found = sample_shards(plan, draw, labels=labels, seeds=seeds, kind=kind, run=run, steps=make_schedule(sampler.steps).num_steps,
                          world=world, overwrite=o.overwrite, adm=o.adm_npz)  # fmt: skip
    if world.is_main:
        title = f"{Path(opened.source).name} | {opened.backend} | {o.steps} steps | cfg {o.cfg_scale}"
        _finish(plan, found, o, kind, labels, seeds, settings, run, world, title=title)


def _finish(plan, found, o: _Options, kind, labels, seeds, settings, run, world, *, title):
    """Rank 0: merge the shards into OUT (unless a finished run of these settings is already there) and say what was written."""
    from ditrt.contracts.files import output_folder
    from ditrt.diffusion.sample_set import preview_indices
    from ditrt.diffusion.shards import merge_shards, shard_samples
    from ditrt.quality.images import sample_grid, save_png

    total, resumed = len(plan.chunks), len(found.done)
    png = Path(o.out_dir) / "samples.png"
    if not found.complete:
        if resumed:
            click.echo(f"resumed {resumed} of {total} shards found in {plan.folder}", err=True)
        with output_folder(Path(o.out_dir)):  # a failed merge removes what it wrote; the shards stay for a re-run
            if kind == "images":
                shown = preview_indices(labels)
                save_png(sample_grid(shard_samples(plan, shown, kind=kind), [labels[i] for i in shown], title=title), png)
            merge_shards(plan, kind=kind, labels=labels, seeds=seeds, settings=settings, run=run, adm=o.adm_npz, keep=o.keep_shards)
    files = {"samples": str(plan.samples), "grid": str(png) if kind == "images" else None,
             "adm_npz": str(plan.adm) if o.adm_npz else None}  # fmt: skip
    if o.as_json:
        click.echo(json.dumps({**files, "kind": kind, "num": o.num, "shards": total, "resumed": resumed, "processes": world.size,
                               "already_complete": found.complete}))  # fmt: skip
        return
    done = f"{o.num} {kind}, {_count(total, 'shard')} ({resumed} resumed) on {_count(world.size, 'process')}"
    if found.complete:
        click.echo(f"{plan.samples} already holds these {o.num} {kind}: nothing to do (--overwrite samples them again)")
    elif kind == "images":
        extra = f" and {plan.adm}" if o.adm_npz else ""
        click.echo(f"wrote {png} and {plan.samples}{extra} ({done})")
    else:
        click.echo(f"wrote latents to {plan.samples} ({done}; no image: pass --vae DIR with a diffusers AutoencoderKL to decode)")


def _count(n: int, thing: str) -> str:
    return f"{n} {thing}{'' if n == 1 else 'es' if thing.endswith('s') else 's'}"


def _batch_size(opened, o: _Options) -> int:
    limit = opened.images_per_call(guided=o.cfg_scale != 1.0)  # a ConfigError when not one image fits
    if o.batch_size is None:
        return DEFAULT_BATCH if limit is None else limit
    if limit is not None and o.batch_size > limit:
        raise ConfigError(
            f"--batch-size {o.batch_size} is more than {opened.source} takes: at most {limit} images per call"
            f"{' with guidance' if o.cfg_scale != 1.0 else ''} ({opened.max_rows} rows); pass --batch-size {limit} or rebuild with a larger `ditrt build --batch`"
        )
    return o.batch_size


def _check_rows(opened, plan, o: _Options) -> None:
    """Refuse, before sampling, a run with a chunk smaller than the backend takes (an engine built with a
    `ditrt build --batch` minimum above 1): the last chunk holds what is left of --num."""
    from ditrt.contracts.profile import rows_per_image

    guided = o.cfg_scale != 1.0
    k, b = rows_per_image(guided), plan.batch_size
    smallest = min(len(c) for c in plan.chunks)
    if smallest * k >= opened.min_rows:
        return
    need = -(-opened.min_rows // k)  # images per call
    fix = f"--batch-size {need} or more" if b < need else f"a --num that fills its last chunk (e.g. --num {-(-o.num // b) * b})"
    rows = f"{smallest * k} rows{' with guidance' if guided else ''}"
    raise ConfigError(
        f"{opened.source} takes at least {opened.min_rows} rows per call, but --num {o.num} in chunks of {b} images has a chunk "
        f"of {smallest} ({rows}); pass {fix}, or rebuild it with `ditrt build --batch 1:OPT:MAX`"
    )


def _run_identity(opened, model, check_graph, o: _Options, sampler, cfg, device: str, vae_device: str) -> dict:
    """What makes two runs' shards interchangeable: the same inputs (by path, size and mtime), settings, seed,
    classes, and the types of the devices that sampled and decoded."""
    from ditrt.diffusion.shards import file_identity
    from ditrt.models.builtin import BUILTIN_DIT, BUILTIN_NAME

    def ident(path):
        return None if path is None else file_identity(BUILTIN_DIT if str(path) == BUILTIN_NAME else path)

    return {
        "artifact": ident(opened.source), "backend": opened.backend, "precision": opened.precision, "model": ident(model),
        "onnx": ident(check_graph), "vae": ident(o.vae_dir), "sampler": sampler.to_dict(), "model_config": cfg.to_dict(),
        "seed": o.seed, "classes": o.classes, "device": device.split(":")[0],
        "vae_device": vae_device.split(":")[0] if o.vae_dir is not None else None,
    }  # fmt: skip


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
    resolved = resolve_device(device)
    if device == "auto" and backend == "onnxruntime":
        from ditrt.runtime.onnxruntime_backend import onnxruntime_device

        return onnxruntime_device(resolved)
    return resolved
