"""The one-shot job: calibrate -> export -> check -> build (TensorRT, when present) -> sample float
and quantized with the same seeds -> evaluate -> compare -> time the float and the quantized graph on
the same backend, into one report.

Every option is validated (:meth:`PipelineConfig.validate`, then the model-dependent checks right
after loading) before calibration starts. The graph that is checked is the graph that runs: when
TensorRT builds, the graph is exported in the float type the precision registry says TensorRT builds
that precision from (:attr:`ditrt.contracts.precisions.Precision.export_dtypes`), checked, and the
engine is built from that file; without TensorRT and a GPU the checked graph runs in ONNX Runtime
(said once). The quantized denoiser is opened with :func:`ditrt.runtime.open.open_denoiser`.

Devices: with ``--device cuda`` the float model, the simulated recipe and the VAE run on that GPU,
the quantized model samples on the device its backend computes on (``opened.device``: the GPU for
TensorRT and for ONNX Runtime with its CUDA provider), and whatever runs on the CPU although a GPU was
asked for is said once (and recorded in the report's ``devices``). The engine is built for the calls
the run makes (:func:`engine_build_config`): sampling chunks of ``min(num, batch_size)`` images (its
optimal batch) and the comparison inputs' rows; every chunk size comes from the engine's profile
(:func:`sampling_batch`).

Speed (:func:`ditrt.compare.speed.speed_comparison`): the float model is exported too, in the float type of the quantized
graph (``float/model.onnx``, or ``float/model-fp16.onnx`` with a float16 engine from it, built with the
quantized engine's build settings), opened with the same backend on the same device, and both are
timed side by side on the comparison inputs (:func:`ditrt.compare.speed.time_side_by_side`): ``speed`` in the report, the
one like-for-like speed figure. The sampling wall times beside it compare two different executors
(torch float against the quantized backend, sampler included) and are labelled so. Cost: one more
dynamo export (seconds on the built-in model; on DiT-XL/2 ``bench/results/export_scale.md`` measured
the float16 float export alone at 46 s and a 4.4 GB peak RSS, a 1.3 GB file, on top of what the run
already holds) and, with TensorRT, a second engine build: the two builds share a timing cache
(``timing.cache``), so layers both engines hold are timed once, but the float Linears' GEMM tactics are
timed anew, so expect up to about twice the build time.

A run that fails or is interrupted leaves nothing: an output folder it created is removed, and in a
folder that existed only the files it wrote are removed (the report is written last, atomically).
"""

from __future__ import annotations

import json
import logging
import platform
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ditrt import __version__
from ditrt.calibrate.config import CalibrateConfig
from ditrt.compare.speed import speed_comparison, speed_line
from ditrt.contracts.errors import ConfigError, MissingDependencyError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "tensorrt", "onnxruntime")
DIGITS_SHAPE = (1, 8, 8)  # what the built-in evaluator (FD, class accuracy) measures


@dataclass(frozen=True)
class PipelineConfig:
    """``calibrate``: how to calibrate (its ``calibration`` settings record the inputs). ``steps``,
    ``cfg_scale``, ``num``, ``seed``, ``classes``, ``batch_size`` (images per sampler call): the
    sampling run of both models. ``backend``: auto (TensorRT when it and a GPU are present and
    ``device`` is cuda, else ONNX Runtime), tensorrt or onnxruntime. ``vae``: a diffusers
    AutoencoderKL folder that decodes a latent model's samples before they are evaluated."""

    calibrate: CalibrateConfig = field(default_factory=CalibrateConfig)
    steps: str = "250"
    cfg_scale: float = 1.5
    num: int = 100
    seed: int = 0
    classes: tuple[int, ...] | None = None
    batch_size: int = 256
    backend: str = "auto"
    device: str = "cpu"
    vae: str | None = None

    def validate(self) -> None:
        """Refuse, before any model is loaded, every option that would fail later (a :class:`ConfigError`)."""
        from ditrt.contracts.precisions import get_precision
        from ditrt.diffusion.sampler import SamplerConfig
        from ditrt.diffusion.schedule import make_schedule

        if self.num <= 0:
            raise ConfigError(f"--num must be positive, got {self.num}")
        if self.batch_size <= 0:
            raise ConfigError(f"--batch-size must be a positive number of images, got {self.batch_size}")
        try:
            make_schedule(str(self.steps))
        except ConfigError as e:
            raise ConfigError(f"--steps: {e}") from None
        SamplerConfig(steps=str(self.steps), cfg_scale=self.cfg_scale)
        if self.backend not in BACKENDS:
            raise ConfigError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        c, p = self.calibrate, get_precision(self.calibrate.precision)
        if not p.tensorrt:
            raise ConfigError(f"{p.name} is a simulation-only precision and cannot be exported: {p.why_not_tensorrt}")
        simulation_only = [flag for flag, on in (("--asymmetric", not c.symmetric), ("--dynamic-activations", c.dynamic_activations)) if on]
        if simulation_only:
            raise ConfigError(f"{' and '.join(simulation_only)}: simulation only (TensorRT cannot run it), so the pipeline cannot export it; drop it")
        if self.vae is not None and not (Path(self.vae) / "config.json").is_file():
            raise ConfigError(f"--vae {self.vae} is not a diffusers AutoencoderKL folder (no config.json); pass e.g. a local sd-vae-ft-ema copy")


def quantized_backend(config: PipelineConfig) -> tuple[str, str]:
    """``(backend, why)`` for the quantized graph, decided before any work: "tensorrt" or "onnxruntime"."""
    from ditrt.engines.build import tensorrt_available

    if config.backend == "onnxruntime":
        return "onnxruntime", "--backend onnxruntime"
    ok, reason = tensorrt_available()
    if ok and not str(config.device).startswith("cuda"):
        ok, reason = False, f"TensorRT runs on a GPU and --device is {config.device}"
    if ok:
        return "tensorrt", "TensorRT and a GPU are present"
    if config.backend == "tensorrt":
        raise MissingDependencyError(f"--backend tensorrt needs TensorRT and a GPU: {reason}")
    return "onnxruntime", reason


def engine_dtype(precision: str) -> str:
    """The float type TensorRT builds ``precision`` from (the registry's export dtypes; float16 where allowed, TensorRT's fast path)."""
    from ditrt.contracts.precisions import get_precision

    dtypes = get_precision(precision).export_dtypes
    return "fp16" if "fp16" in dtypes else dtypes[0]


def run_pipeline(model_spec, config: PipelineConfig, out_dir: Path, *, echo: Callable[[str], None] = print,
                 load: dict | None = None) -> dict:
    """Run every stage; returns the report dict (also written as OUT/report.json and report.md). ``load``: the
    keywords of :func:`ditrt.models.builtin.load_model` for a checkpoint that records no config."""
    config.validate()
    backend, why = quantized_backend(config)
    from ditrt.contracts.files import check_writable, output_folder

    out_dir = check_writable(Path(out_dir), folder=True)
    with output_folder(out_dir):
        return _run(model_spec, config, backend, why, out_dir, echo, load or {})


def _run(model_spec, config: PipelineConfig, backend: str, why: str, out_dir: Path, echo, load: dict) -> dict:
    from ditrt.calibrate.ptq import calibrate
    from ditrt.contracts.precisions import get_precision
    from ditrt.contracts.recipe import save_recipe
    from ditrt.diffusion.recording import record_calibration_inputs
    from ditrt.diffusion.sample_set import default_labels
    from ditrt.models.builtin import is_pixel_model, load_model
    from ditrt.runtime.open import open_denoiser

    timings: dict[str, float] = {}
    clock = _Clock(timings)
    c = config.calibrate
    report: dict = {"ditrt_version": __version__, "model": str(model_spec), "config": _jsonable(asdict(config)),
                    "machine": f"{platform.machine()}, torch {torch.__version__}", "files": []}  # fmt: skip

    with clock("load"):
        model = load_model(model_spec, **load)
    pixel, cfg = is_pixel_model(model), model.config
    labels = default_labels(config.num, cfg.num_classes, list(config.classes) if config.classes else None)
    if config.vae is not None and (pixel or cfg.in_channels != 4):
        raise ConfigError(f"--vae decodes 4-channel latents, but {model_spec} makes {cfg.in_channels}-channel images; drop --vae")
    report["model_config"] = cfg.to_dict()
    dtype = engine_dtype(c.precision) if backend == "tensorrt" else "fp32"
    files = _Files(out_dir, report["files"])
    report["devices"] = {"float": config.device, "simulation": config.device, "calibration": config.device}

    s = c.calibration
    echo(f"[1/7] calibrating {c.method} {c.precision} on {s.timesteps} steps x {s.samples} samples of a {s.steps}-step run")
    with clock("calibrate"):
        model.to(config.device)
        batches = record_calibration_inputs(model, s, device=config.device, pixel_space=pixel, progress=True)
        recipe, tensors = calibrate(model, c, batches, device=config.device)
        model.cpu()
        files.add(save_recipe(recipe, tensors, out_dir / "recipe"))
    report["recipe"] = recipe_report(recipe)
    if not recipe.deployable:
        raise ConfigError(f"the {c.method} {c.precision} recipe is simulation only (e.g. per-channel INT4 choices) and cannot be exported; "
                          "use TensorRT's INT4 blocks (--qdit-choices 64,128)")  # fmt: skip

    echo(f"[2/7] exporting the quantized {dtype} ONNX graph {backend} will run, and checking it against the TensorRT rules")
    graph, graphs = _export(model, recipe, tensors, dtype, out_dir, clock)
    files.add(graph, *(f for g in graphs for f in _graph_files(g)))
    violations = _check(graphs, clock)
    report["check"] = {"graphs": [p.name for p in graphs], "dtype": dtype, "violations": violations, "passed": not violations}
    report["sizes_bytes"] = {"onnx": sum(_size(p) for p in graphs), "recipe_weights": (out_dir / "recipe" / "weights.safetensors").stat().st_size}

    with clock("record_inputs"):
        feeds = _record_feeds(model, pixel, config, report)
    build = None
    if backend == "tensorrt":  # the float engine of the speed comparison shares these settings and the timing cache
        build = engine_build_config(config, feed_rows=max(len(f["x"]) for f in feeds), timing_cache=out_dir / "timing.cache")
        echo(f"[3/7] building the TensorRT engine from the checked {dtype} graph (strongly typed) for {build.batch_max} images per call")
        with clock("build"):
            artifact = _build(graph, out_dir, config, build, files)
        report["sizes_bytes"]["engine"] = sum(_size(p) for p in files.engines)
        opened = open_denoiser(artifact, onnx=graph, device=config.device)
    else:
        echo(f"[3/7] no TensorRT engine ({why.rstrip('.')}): running the checked graph with ONNX Runtime")
        report["tensorrt"] = {"available": False, "reason": why}
        from ditrt.runtime.onnxruntime_backend import onnxruntime_device

        ort_device = onnxruntime_device(config.device)
        if ort_device != config.device:
            echo(f"note: this ONNX Runtime has no CUDA provider (pip install onnxruntime-gpu): the quantized graph runs on the CPU, not {config.device}")
        opened = open_denoiser(graph, device=ort_device)
    report["devices"]["quantized"] = opened.device
    report["quantized"] = {"backend": opened.backend, "artifact": Path(opened.source).name, "graph": graph.name, "dtype": dtype,
                           "parity": asdict(get_precision(recipe.precision).parity)}  # fmt: skip
    with opened:
        _sample_evaluate_compare(model, recipe, tensors, opened, labels, pixel, config, out_dir, files, report, clock, echo, feeds)
        _speed(model, dtype, opened, feeds, build, config, out_dir, files, report, clock, echo)
    report["timings_seconds"] = {k: round(v, 3) for k, v in timings.items()}
    files.add(out_dir / "report.json", out_dir / "report.md")
    _write_report(report, out_dir)
    return report


def _sample_evaluate_compare(model, recipe, tensors, opened, labels, pixel, config, out_dir, files, report, clock, echo, feeds) -> None:
    from ditrt.diffusion.sample_set import SampleSet
    from ditrt.models.quantized import quantized_model

    cfg = model.config
    seeds = [config.seed + i for i in range(config.num)]
    batch = sampling_batch(config, max_rows=opened.max_rows, min_rows=opened.min_rows)
    echo(f"[4/7] sampling {config.num} images at {config.steps} steps, float (torch, {config.device}) and quantized "
         f"({opened.backend}, {opened.device}), same seeds")  # fmt: skip
    with clock("sample_float"):
        float_out = _sample(model.to(config.device), cfg, config, labels, seeds, pixel, batch, config.device)
    model.cpu()
    with clock("sample_quantized"):
        quant_out = _sample(opened.denoiser, cfg, config, labels, seeds, pixel, batch, opened.device)
    _per_step_timings(report, clock.timings, config, batch, opened.backend, opened.device)
    settings = {"model": report["model"], "steps": config.steps, "cfg_scale": config.cfg_scale}
    kind = "images" if pixel else "latents"
    for name, data, backend in (("float", float_out, "torch"), ("quantized", quant_out, opened.backend)):
        files.add(SampleSet(data, np.asarray(labels), np.asarray(seeds), kind, {**settings, "backend": backend}).save(out_dir / name / "samples.npz"))

    float_images = quant_images = None
    if pixel:
        float_images, quant_images = float_out, quant_out
    elif config.vae is not None:
        from ditrt.runtime.vae import load_vae

        echo(f"decoding both sample sets with the VAE in {config.vae} on {config.device}")
        report["devices"]["vae"] = config.device
        with clock("decode"):
            decode = load_vae(config.vae, config.device)  # once for both sets
            float_images, quant_images = decode(float_out), decode(quant_out)
    echo("[5/7] evaluating")
    with clock("evaluate"):
        report["quality"] = evaluate_pair(float_out, quant_out, float_images, quant_images, labels, pixel=pixel)
    if float_images is not None:
        _pictures(float_images, quant_images, labels, config, recipe, opened.backend, out_dir, files)

    echo("[6/7] comparing the quantized graph with the torch simulation of the recipe (Polygraphy)")
    with clock("compare"):
        simulated = quantized_model(model, recipe, tensors)
        report["compare"] = _compare(model, simulated, recipe.precision, opened, feeds, config.device, out_dir, files)


def recipe_report(recipe) -> dict:
    """The report's ``recipe`` section: counts of what the recipe quantizes, balances and smooths at run
    time, its weight rounding, the layers it leaves in float with their sensitivity records, and the
    summary of the float fallback that chose them (``details["fallback"]``; the full ranking stays in
    ``recipe/recipe.json``)."""
    out = {"method": recipe.method, "precision": recipe.precision, "layers": len(recipe.layers), "balanced_layers": len(recipe.balanced_layers),
           "weight_rounding": recipe.weight_rounding, "runtime_smoothed": len(recipe.runtime_smoothed),
           "float_layers": {k: dict(v) for k, v in recipe.float_layers.items()}, "notes": list(recipe.notes), "deployable": recipe.deployable,
           "timestep_groups": recipe.timestep_groups}  # fmt: skip
    fallback = recipe.details.get("fallback")
    if fallback:
        out["fallback"] = {k: fallback[k] for k in ("budget", "met", "psnr_full_db", "psnr_db", "probe", "seconds") if k in fallback}
    return out


def recipe_markdown(rec: dict) -> list[str]:
    """The report.md lines of :func:`recipe_report`'s section."""
    lines = ["## Recipe", "", f"{rec['method']} {rec['precision']}: {rec['layers']} quantized layers ({rec['balanced_layers']} balanced, "
             f"{rec.get('runtime_smoothed', 0)} smoothed at run time), weight rounding {rec.get('weight_rounding', 'rtn')}, "
             f"{rec['timestep_groups']} timestep group(s) of activation scales; {len(rec.get('float_layers', {}))} layer(s) left in float.", ""]  # fmt: skip
    floats = rec.get("float_layers") or {}
    if floats:
        lines += ["| layer left in float | sensitivity | SQNR gain dB | rank |", "|---|---|---|---|"]
        for layer, r in sorted(floats.items(), key=lambda kv: kv[1].get("rank", 0)):
            gain = f"{r['sqnr_gain_db']:.2f}" if isinstance(r.get("sqnr_gain_db"), (int, float)) else "-"
            lines.append(f"| `{layer}` | {r['sensitivity']:.3g} | {gain} | {r.get('rank', '-')} |")
        lines += ["", "sensitivity: how much leaving only that layer in float lowers the one-step relative squared error of the "
                  "noise prediction (SQNR gain: the same in dB); the full ranking is in `recipe/recipe.json`.", ""]  # fmt: skip
    fb = rec.get("fallback")
    if fb:
        budget = fb.get("budget", {})
        asked = " and ".join(x for x in (f"probe PSNR >= {budget['min_psnr']:g} dB" if budget.get("min_psnr") is not None else "",
                                         f"at most {budget['max_float_layers']} float layers" if budget.get("max_float_layers") is not None else "") if x)  # fmt: skip
        probe = fb.get("probe", {})
        psnr = f"{fb['psnr_full_db']:.2f} dB fully quantized -> {fb['psnr_db']:.2f} dB" if "psnr_db" in fb and "psnr_full_db" in fb else "not probed"
        lines += [f"Float fallback: budget {asked or 'none'}: {'met' if fb.get('met') else 'NOT met'}; probe PSNR {psnr} "
                  f"({probe.get('samples', '?')} samples, {probe.get('steps', '?')} steps, on {probe.get('measured_on', '?')}).", ""]  # fmt: skip
    return lines


def evaluate_pair(float_out, quant_out, float_images, quant_images, labels, *, pixel: bool) -> dict:
    """What was measured on what: ``measured_on`` ("pixels", "decoded images" or "latents"), the paired
    errors, the digits evaluator's FD and class accuracy where it applies, and ``absent``: why a metric is missing."""
    from ditrt.quality import metrics

    out: dict = {"absent": {}}
    if float_images is None:
        out["measured_on"] = "latents"
        out["latent_rel_l2"] = metrics.relative_error(torch.from_numpy(float_out), torch.from_numpy(quant_out))
        out["absent"]["psnr_db"] = "latents have no fixed value range; pass --vae DIR to measure PSNR on decoded images"
    else:
        out["measured_on"] = "pixels" if pixel else "decoded images"
        out["psnr_db"] = metrics.paired_psnr(float_images, quant_images)
        if not pixel:
            out["latent_rel_l2"] = metrics.relative_error(torch.from_numpy(float_out), torch.from_numpy(quant_out))
    if float_images is not None and tuple(np.asarray(float_images).shape[1:]) == DIGITS_SHAPE:
        out.update(
            fd_float=metrics.fd_to_real(float_images), fd_quantized=metrics.fd_to_real(quant_images), fd_floor=metrics.fd_floor(),
            class_accuracy_float=metrics.class_accuracy(float_images, labels),
            class_accuracy_quantized=metrics.class_accuracy(quant_images, labels),
        )  # fmt: skip
        out["fd_relative_change"] = (out["fd_quantized"] - out["fd_float"]) / out["fd_float"]
    else:
        what = "latents" if float_images is None else f"{tuple(np.asarray(float_images).shape[1:])} images"
        reason = f"the built-in evaluator's classifier measures {DIGITS_SHAPE} digits, not {what}"
        out["absent"].update(fd=reason, class_accuracy=reason)
        if float_images is not None and np.asarray(float_images).shape[1] == 3:
            out["absent"]["fid"] = ("ImageNet FID needs the Inception file and the ADM reference batch, and thousands of samples: "
                                    "run `ditrt evaluate quantized/samples.npz --reference-batch REF.npz --inception FILE`")  # fmt: skip
    return out


class _Clock:
    """``with clock("stage"):`` records the stage's wall seconds into ``timings``."""

    def __init__(self, timings: dict[str, float]):
        self.timings = timings

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        self.timings[name] = time.perf_counter() - start


class _Files:
    """The files the run wrote (paths relative to the output folder, for the report and the CLI)."""

    def __init__(self, root: Path, names: list[str]):
        self.root, self.names, self.engines = root, names, []

    def add(self, *paths: Path) -> None:
        for p in paths:
            name = str(Path(p).relative_to(self.root)) + ("/" if Path(p).is_dir() else "")
            if name not in self.names:
                self.names.append(name)


def _jsonable(d):
    return json.loads(json.dumps(d, default=str))


def _graph_files(path: Path) -> list[Path]:
    """An ONNX graph and its external data files (none below 1.8 GB of weights); any other file alone."""
    from ditrt.contracts.files import external_locations, load_onnx_graph

    path = Path(path)
    extra = external_locations(load_onnx_graph(path)) if path.suffix == ".onnx" else ()
    return [path, *(path.parent / e for e in extra)]


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in _graph_files(path))


def _export(model, recipe, tensors, dtype: str, out_dir: Path, clock) -> tuple[Path, list[Path]]:
    """``(artifact, graphs)``: one graph, or for a recipe with timestep groups the manifest and its graphs."""
    from ditrt.contracts.groups import read_artifact
    from ditrt.export.onnx_export import export_model

    path = out_dir / ("model.onnx" if dtype == "fp32" else f"model-{dtype}.onnx")
    with clock("export"):
        artifact = export_model(model, path, dtype=dtype, recipe=recipe, tensors=tensors)
    return artifact, read_artifact(artifact)[2]


def _speed(model, dtype: str, opened, feeds: list, build, config: PipelineConfig, out_dir: Path, files: _Files, report: dict, clock, echo) -> None:
    """The last stage: the float model exported in the quantized graph's float type (no recipe), with
    TensorRT built into a float engine with the quantized engine's ``build`` settings, then
    :func:`ditrt.compare.speed.speed_comparison` on the comparison inputs."""
    from ditrt.export.onnx_export import export_model

    echo(f"[7/7] exporting the float {dtype} graph" + (" and building its engine with the same settings" if build else "")
         + f", then timing it and the quantized graph side by side on {opened.backend} ({opened.device})")  # fmt: skip
    with clock("export_float"):
        float_graph = export_model(model, out_dir / "float" / ("model.onnx" if dtype == "fp32" else f"model-{dtype}.onnx"), dtype=dtype)
    files.add(*_graph_files(float_graph))
    report["sizes_bytes"]["onnx_float"] = _size(float_graph)
    artifact, options = float_graph, {}
    if build is not None:
        with clock("build_float"):
            artifact, options = _build_float(float_graph, out_dir, config, build, files), {"onnx": float_graph}
        report["sizes_bytes"]["engine_float"] = _size(artifact)
    with clock("speed"):
        report["speed"] = speed_comparison(artifact, opened, feeds, out_dir=out_dir, **options)
    echo(speed_line(report["speed"]))


def _check(graphs: list[Path], clock) -> list[dict]:
    from ditrt.export import check_onnx

    with clock("check"):
        return [{"graph": g.name, "node": v.node, "rule": v.rule, "message": v.message} for g in graphs for v in check_onnx(g)]


def engine_build_config(config: PipelineConfig, *, feed_rows: int, **options):
    """The :class:`~ditrt.contracts.profile.BuildConfig` of the pipeline's engines (quantized and float):
    its opt batch the sampling chunk (``min(num, batch_size)`` images, guidance doubling the rows), its
    max also covering the ``feed_rows`` rows of each comparison input (Polygraphy replays ``inputs.json``
    on the engine, and the speed comparison times both engines on them), its min one image (a run's
    last, smaller chunk). ``options``: the other BuildConfig fields (the pipeline's timing cache)."""
    from ditrt.contracts.profile import build_for_calls

    return build_for_calls(min(config.num, config.batch_size), guided=config.cfg_scale != 1.0, rows=feed_rows, **options)


def sampling_batch(config: PipelineConfig, *, max_rows: int | None, min_rows: int = 1) -> int:
    """Images per sampler call for both models: ``--batch-size``, at most ``--num``, and at most what
    the quantized backend's profile takes (:func:`ditrt.contracts.profile.images_per_call`)."""
    from ditrt.contracts.profile import images_per_call

    limit = images_per_call(max_rows, guided=config.cfg_scale != 1.0, source="the quantized engine", min_rows=min_rows)
    return min(config.batch_size, config.num, limit or config.num)


def _build(graph: Path, out_dir: Path, config: PipelineConfig, build, files: _Files) -> Path:
    from ditrt.contracts.groups import read_artifact
    from ditrt.contracts.sidecar import sidecar_path
    from ditrt.engines.build import build_engines

    artifact = build_engines(graph, out_dir / "model.plan", build, device=config.device)
    engines = read_artifact(artifact)[2]
    files.engines = engines
    files.add(artifact, *engines, *(sidecar_path(e) for e in engines))
    return artifact


def _build_float(float_graph: Path, out_dir: Path, config: PipelineConfig, build, files: _Files) -> Path:
    """The float engine: built from the float graph with the quantized engine's settings ``build``."""
    from ditrt.contracts.sidecar import sidecar_path
    from ditrt.engines.build import build_engines

    engine = build_engines(float_graph, out_dir / "float" / "model.plan", build, device=config.device)
    files.add(engine, sidecar_path(engine))
    if build.timing_cache is not None and build.timing_cache.exists():
        files.add(build.timing_cache)
    return engine


def _sample(denoiser, cfg, config: PipelineConfig, labels, seeds, pixel, batch: int, device: str):
    from ditrt.diffusion.sample_set import generate
    from ditrt.diffusion.sampler import SamplerConfig

    sampler = SamplerConfig(steps=config.steps, cfg_scale=config.cfg_scale, clip_denoised=pixel)
    return generate(denoiser, sampler, labels, seeds, num_classes=cfg.num_classes, image_shape=(cfg.in_channels, cfg.input_size, cfg.input_size),
                    device=device, batch_size=batch, progress=True)  # fmt: skip


def _per_step_timings(report: dict, timings: dict, config: PipelineConfig, batch: int, backend: str, device: str) -> None:
    from ditrt.diffusion.schedule import make_schedule

    calls = make_schedule(config.steps).num_steps * -(-config.num // batch)
    timings["ms_per_step_float"] = 1000 * timings["sample_float"] / calls
    timings["ms_per_step_quantized"] = 1000 * timings["sample_quantized"] / calls
    report["sampling"] = {"batch_images": batch, "network_batch": batch * (2 if config.cfg_scale != 1.0 else 1), "sampler_calls": calls,
                          "executors": {"float": f"torch ({config.device})", "quantized": f"{backend} ({device})"},
                          "note": "end-to-end sampling wall time of two different executors (sampler included), not a speed-up: "
                                  "the same-backend comparison is `speed`"}  # fmt: skip


def _pictures(float_images, quant_images, labels, config, recipe, backend, out_dir: Path, files: _Files) -> None:
    from ditrt.quality.images import sample_grid, save_png, side_by_side

    g_float = sample_grid(float_images, labels, title=f"float (torch), {config.steps} steps")
    g_quant = sample_grid(quant_images, labels, title=f"{recipe.method} {recipe.precision} ({backend})")
    files.add(save_png(g_float, out_dir / "float" / "samples.png"), save_png(g_quant, out_dir / "quantized" / "samples.png"))
    files.add(save_png(side_by_side([g_float, g_quant]), out_dir / "comparison.png"))


def _record_feeds(model, pixel: bool, config: PipelineConfig, report: dict) -> list:
    """The comparison inputs (recorded by the float model on --device before the engine is built, which must take them)."""
    from ditrt.compare.inputs import record_feeds

    report["devices"]["comparison_inputs"] = config.device
    feeds = record_feeds(model.to(config.device), pixel_space=pixel, device=config.device)
    model.cpu()
    return feeds


def _compare(model, simulated, precision: str, opened, feeds: list, device: str, out_dir: Path, files: _Files) -> dict:
    """Polygraphy's comparison of the quantized backend with the simulation on ``feeds``, each on its own
    device (the simulation and the float reference on ``device``, the backend on ``opened.device``)."""
    from ditrt.compare.accuracy import compare_runners
    from ditrt.compare.inputs import save_feeds
    from ditrt.compare.runners import DenoiserRunner
    from ditrt.contracts.precisions import get_precision
    from ditrt.quality.metrics import error_by_timestep

    cfg = model.config
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    files.add(save_feeds(feeds, out_dir / "inputs.json"))
    sim = DenoiserRunner(simulated.to(device), image_shape=shape, name="torch-simulated-recipe", device=device)
    quant = DenoiserRunner(opened.denoiser, image_shape=shape, name=f"{opened.backend}-quantized", device=opened.device)
    tol = get_precision(precision).parity  # the registry says how closely a graph of this precision follows its simulation
    try:
        result = compare_runners(sim, quant, feeds, atol=tol.atol, rtol=tol.rtol, error_stat=tol.error_stat)
        records = [tuple(torch.from_numpy(f[k]).to(device) for k in ("x", "t", "y")) for f in feeds]
        result["noise_error_vs_float"] = error_by_timestep(model.to(device), opened.denoiser, records, channels=cfg.in_channels)
    finally:
        simulated.cpu()
        model.cpu()
    result["inputs_file"] = "inputs.json"
    return result


def _write_report(report: dict, out_dir: Path) -> None:
    from ditrt.contracts.files import atomic_write

    atomic_write(out_dir / "report.json", lambda tmp: tmp.write_text(json.dumps(report, indent=2) + "\n"))
    atomic_write(out_dir / "report.md", lambda tmp: tmp.write_text(report_markdown(report)))


def report_markdown(r: dict) -> str:
    q, c, t, qz = r["quality"], r["compare"], r["timings_seconds"], r["quantized"]
    out = c["outputs"]["out"]
    backend = "TensorRT" if qz["backend"] == "tensorrt" else f"ONNX Runtime (no TensorRT engine: {r.get('tensorrt', {}).get('reason', '')})"
    lines = [
        f"# ditrt pipeline report: {r['recipe']['method']} {r['recipe']['precision']} on {r['model']}",
        "",
        f"ditrt {r['ditrt_version']}; {r['machine']}. Quantized backend: {backend}, running `{qz['artifact']}` "
        f"(from the checked {qz['dtype']} graph `{qz['graph']}`).",
        "",
    ]
    if "comparison.png" in r["files"]:
        lines += ["![float vs quantized](comparison.png)", ""]
    lines += [f"## Quality (same seeds and labels; measured on {q['measured_on']})", "", "| | float | quantized |", "|---|---|---|"]
    if "fd_float" in q:
        lines += [
            f"| FD (floor {q['fd_floor']:.2f}) | {q['fd_float']:.2f} | {q['fd_quantized']:.2f} ({100 * q['fd_relative_change']:+.1f}%) |",
            f"| class accuracy | {q['class_accuracy_float']:.3f} | {q['class_accuracy_quantized']:.3f} |",
        ]
    if "psnr_db" in q:
        lines.append(f"| paired PSNR vs float ({q['measured_on']}) | - | {q['psnr_db']:.2f} dB |")
    if "latent_rel_l2" in q:
        lines.append(f"| relative L2 vs float (latents) | - | {q['latent_rel_l2']:.4f} |")
    lines += [""] + [f"- {name} not measured: {why}" for name, why in q["absent"].items()] + ([""] if q["absent"] else [])
    if "speed" in r:
        sp = r["speed"]
        lines += ["## Speed: quantized vs float graph on the same backend, in the same run", "", f"{speed_line(sp)}; on {sp['device']}; "
                  f"{sp['ratio']:.2f}x = float ms / quantized ms (> 1: quantized faster), `{sp['float']['artifact']}` vs "
                  f"`{sp['quantized']['artifact']}`. Measured: {sp['how']}.", ""]  # fmt: skip
    lines += recipe_markdown(r["recipe"])
    lines += [
        "## Parity: quantized graph vs the torch simulation of the recipe (Polygraphy)",
        "",
        f"relative L2 {out['rel_l2']:.2e}, max abs {out['max_abs']:.2e}, cosine {out['cosine']:.6f}, SNR {out['snr_db']:.1f} dB "
        f"(Polygraphy {c['error_stat']} error within atol/rtol {c['atol']}/{c['rtol']}, the registry's tolerance for "
        f"{r['recipe']['precision']}: {'passed' if c['passed'] else 'failed'}); inputs: `{c['inputs_file']}`.",
        "",
        "Noise-prediction error vs the float model, per timestep: "
        + ", ".join(f"t={row['t']:.0f}: {row['rel_error']:.4f}" for row in c["noise_error_vs_float"]),
        "",
        "## Checks, sizes, timings",
        "",
        f"- `ditrt check` of {', '.join(f'`{g}`' for g in r['check']['graphs'])} (the graph that runs): "
        + ("no violations" if r["check"]["passed"] else "; ".join(f"{v['node']}: [{v['rule']}] {v['message']}" for v in r["check"]["violations"])),
        "- sizes: " + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in r["sizes_bytes"].items()),
        f"- end-to-end sampling wall time per denoising step ({r['sampling']['batch_images']} images per call, network batch "
        f"{r['sampling']['network_batch']}), two different executors, not a speed-up (that is the Speed section): float in torch "
        f"{t['ms_per_step_float']:.1f} ms, quantized in {qz['backend']} {t['ms_per_step_quantized']:.1f} ms",
        "- stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in t.items() if not k.startswith("ms_")),
        "- files: " + ", ".join(f"`{f}`" for f in r["files"]),
    ]
    lines += [f"- note: {n}" for n in r["recipe"]["notes"]]
    return "\n".join(lines) + "\n"

