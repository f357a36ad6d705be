"""The quality table: float vs every calibration method at every registered precision (w8a8, w4a16, fp8; w4a8 simulated), on the
built-in model and its stress variant, with N samples per row chosen per step count.

A benchmark, not a test: it writes docs/results/quality.md and docs/results/quality.json.

    .venv/bin/python bench/quality_table.py --num 250=64 50=256 --out docs/results

``--num`` is one N for every ``--steps`` count (``--num 256 --steps 50``) or one ``STEPS=N`` per step
count (the default, ``250=64 50=256``: the 250-step rows cost 5x more per sample). Each row is cached
(``--cache``) as soon as it is measured, keyed by (model, method, precision, steps, N, backend) and
the measurement protocol (calibration and held-out settings, bootstrap), so the table can be built
in parts (``--models``, ``--methods``, ``--precisions``, ``--steps`` select what to measure; each also
takes comma-separated lists) and is always written from the cache: every cached row of the (steps, N)
pairs asked for, measured under the current protocol. ``--table-only`` rebuilds it without measuring.

A method is a spec: a base method (``minmax``, ``smoothquant``, ``ptq4dit``, and whatever else
``ditrt calibrate --method`` accepts), optionally followed by ``+option`` suffixes that map to
:class:`CalibrateConfig` fields (:data:`OPTIONS`, :data:`PATTERNS`), e.g. ``ptq4dit+recon`` (block
reconstruction), ``minmax+k4`` (4 timestep groups of activation scales), ``ptq4dit+mm`` (min-max
scales instead of the MSE clip search), ``ptq4dit+out`` (the output-aware search), ``minmax+gptq``
(GPTQ weights), ``smoothquant+a1+fc2`` (alpha 1.0, fc2 smoothed at run time), ``ptq4dit+fb50``
(layers left in float until the paired probe reaches 50 dB), ``ptq4dit+fl4`` (at most 4 float layers).

Columns: paired PSNR of each quantized model's samples against the float model's samples made from
the same seeds and labels, with its 95% percentile bootstrap interval over samples; the one-step SQNR
of the noise prediction on held-out inputs (recorded along float trajectories from another seed than
calibration), mean over timesteps and pooled (per timestep in the JSON); FD (with its floor) and
class accuracy as sanity columns. The noise floor row runs one recipe (``--floor``) in ONNX Runtime
from its exported graph: its paired PSNR against the same recipe run by torch is how far execution
alone moves a row. Rows are ranked only where their intervals separate (see :func:`ranks`).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ditrt import __version__
from ditrt.calibrate.methods import get_method
from ditrt.calibrate.observe import observe_linear_inputs
from ditrt.calibrate.ptq import CalibrateConfig, calibrate
from ditrt.calibrate.stress import inject_salient_channels
from ditrt.contracts.errors import ConfigError
from ditrt.contracts.files import atomic_write, state_dict_hash, tensors_sha256
from ditrt.contracts.precisions import PRECISIONS as PRECISION_REGISTRY
from ditrt.contracts.recipe import CalibrationSettings
from ditrt.diffusion.recording import record_calibration_inputs
from ditrt.diffusion.sample_set import generate
from ditrt.diffusion.sampler import SamplerConfig
from ditrt.export.onnx_export import export_model
from ditrt.models.builtin import load_model
from ditrt.models.quantized import quantized_model
from ditrt.quality import metrics
from ditrt.runtime.open import open_denoiser

METHODS = ("minmax", "smoothquant", "ptq4dit")
PRECISIONS = tuple(PRECISION_REGISTRY)  #: every registered precision, in registration order
MODELS = ("builtin", "stress")
#: where a row's samples come from: torch (the simulation, against torch float samples), onnxruntime
#: (the exported graphs, against the float graph's samples), floor (a recipe's graph against torch float)
BACKENDS = ("torch", "floor", "onnxruntime")
REL_FD_MIN_NUM = 256  #: rows of at least this many samples show FD relative to float
CFG_SCALE = 1.5
CONFIDENCE, RESAMPLES = 0.95, 2000  #: the bootstrap interval of paired PSNR
#: method-spec suffix -> CalibrateConfig fields
OPTIONS = {
    "recon": {"reconstruct": True},
    "dyn": {"dynamic_activations": True},
    "k2": {"timestep_groups": 2},
    "k4": {"timestep_groups": 4},
    "mm": {"weight_search": "minmax", "act_search": "minmax"},  # min-max scales instead of the MSE clip search (non-minmax methods' default)
    "out": {"weight_search": "output", "act_search": "output"},  # scales minimising each quantized layer's output error
    "wout": {"weight_search": "output", "act_search": "minmax"},  # output-aware weight scales, min-max activation scales
    "gptq": {"weights": "gptq"},
    "rtn": {"weights": "rtn"},  # round to nearest where the precision's default rounding is GPTQ (w4a16)
    "fc2": {"smooth_fc2": True},
}
#: parametrised suffixes: ``+fbNN`` (min_psnr NN dB), ``+flN`` (max_float_layers N), ``+aX`` (the method's alpha X)
PATTERNS = {
    re.compile(r"fb(\d+(?:\.\d+)?)"): lambda m, base: {"min_psnr": float(m[1])},
    re.compile(r"fl(\d+)"): lambda m, base: {"max_float_layers": int(m[1])},
    re.compile(r"a(\d+(?:\.\d+)?)"): lambda m, base: {"method_settings": _with_alpha(base, float(m[1]))},
}


def _with_alpha(base: str, alpha: float):
    settings = get_method(base).settings
    if "alpha" not in {f.name for f in dataclasses.fields(settings)}:
        raise ConfigError(f"+a{alpha:g} sets a migration strength, which {base} does not have (smoothquant does)")
    return settings(alpha=alpha)


def config_for(spec: str, precision: str, settings: CalibrationSettings) -> CalibrateConfig:
    """The CalibrateConfig of a method spec; an unknown suffix or an invalid combination is a
    :class:`SystemExit` naming it (checked for every row before any measurement)."""
    base, *opts = spec.split("+")
    fields = {}
    try:
        for o in opts:
            if o in OPTIONS:
                fields.update(OPTIONS[o])
                continue
            match = next(((m, make) for p, make in PATTERNS.items() if (m := p.fullmatch(o))), None)
            if match is None:
                raise ConfigError(f"unknown method option +{o}; known: {', '.join(OPTIONS)}, fbNN (min PSNR), flN (max float layers), aX (alpha)")
            fields.update(match[1](match[0], base))
        return CalibrateConfig(method=base, precision=precision, calibration=settings, **fields)
    except ConfigError as e:
        raise SystemExit(f"method {spec} at {precision}: {e}") from None


def stress_variant(model, batches):
    """The built-in model with DiT-like salient channels injected by an exact transform."""
    stressed = copy.deepcopy(model)
    names = [f"blocks.{i}.{n}" for i in range(len(model.blocks)) for n in ("attn.qkv", "mlp.fc1")]
    stats = observe_linear_inputs(model, names, batches)
    sal = {n: s.channel_max_by_step().amax(0) for n, s in stats.items()}
    info = inject_salient_channels(stressed, act_salience=sal, seed=0)
    return stressed.eval(), info


def sample_images(model, steps: str, num: int, *, device: str = "cpu", batch: int = 512, first_seed: int = 0) -> np.ndarray:
    """N samples with labels cycling 0-9 and seeds 0..N-1 (the same for every row; ``first_seed``: others)."""
    cfg = model.config
    sampler = SamplerConfig(steps=steps, cfg_scale=CFG_SCALE, clip_denoised=True)
    labels, seeds = [i % cfg.num_classes for i in range(num)], list(range(first_seed, first_seed + num))
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    return generate(model, sampler, labels, seeds, num_classes=cfg.num_classes, image_shape=shape, device=device, batch_size=batch, progress=True)


class Cache:
    """One JSON file per measured row, one npy per sample set, one safetensors per recording."""

    def __init__(self, root: Path):
        self.root = Path(root) / "v2"
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, *key, ext="json") -> Path:
        return self.root / ("__".join(str(k) for k in key) + f".{ext}")

    def row(self, key: tuple, protocol: dict) -> dict | None:
        p = self._path(*key)
        row = json.loads(p.read_text()) if p.exists() else None
        return row if row is not None and row.get("protocol") == protocol else None

    def put_row(self, row: dict, key: tuple) -> None:
        atomic_write(self._path(*key), lambda tmp: tmp.write_text(json.dumps(row, indent=1)))

    def samples(self, key: tuple, make) -> np.ndarray:
        p = self._path(*key, ext="npy")
        if p.exists():
            return np.load(p, allow_pickle=False)
        imgs = np.asarray(make(), dtype=np.float32)

        def write(tmp):
            with open(tmp, "wb") as f:
                np.save(f, imgs)

        atomic_write(p, write)
        return imgs

    def recording(self, model, settings: CalibrationSettings) -> list:
        """:func:`record_calibration_inputs` of ``model`` (pixel space), kept per model weights and settings."""
        from safetensors.torch import load_file, save_file

        s = settings
        p = self._path("inputs", state_dict_hash(model)[:12], f"seed{s.seed}-s{s.steps}-t{s.timesteps}-n{s.samples}-cfg{s.cfg_scale}", ext="safetensors")
        if p.exists():
            d = load_file(str(p))
            return [(d[f"x{i}"], d[f"t{i}"], d[f"y{i}"]) for i in range(len(d) // 3)]
        t0 = time.perf_counter()
        batches = record_calibration_inputs(model, settings, pixel_space=True, progress=True)
        log(f"recorded {s.timesteps} steps x {s.samples} samples (seed {s.seed}) in {time.perf_counter() - t0:.0f} s")
        tensors = {f"{n}{i}": v.contiguous() for i, b in enumerate(batches) for n, v in zip("xty", b)}
        atomic_write(p, lambda tmp: save_file(tensors, str(tmp)))
        return batches

    def rows(self, plan: list[tuple[str, int]], protocol: dict) -> list[dict]:
        rows = [json.loads(p.read_text()) for p in sorted(self.root.glob("*__*.json"))]
        wanted = [r for r in rows if (str(r["steps"]), r["num"]) in plan]
        kept = [r for r in wanted if r.get("protocol") == protocol]
        if len(kept) < len(wanted):
            log(f"left out {len(wanted) - len(kept)} cached rows measured under another protocol")
        return kept


def timed_calibration(model, config: CalibrateConfig, batches) -> tuple:
    """``(recipe, tensors, timing)``: the calibrate call alone on the recorded inputs, nothing else
    running in this process; ``timing`` has wall and CPU seconds, torch's threads and the machine's
    1/5/15-minute load averages right after it (other jobs on the machine make times incomparable)."""
    gc.collect()
    w0, c0 = time.perf_counter(), time.process_time()
    recipe, tensors = calibrate(model, config, batches)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    timing = {"calib_seconds": round(wall, 1), "calib_cpu_seconds": round(cpu, 1), "threads": torch.get_num_threads(),
              "loadavg": [round(v, 2) for v in os.getloadavg()], "cpus": os.cpu_count()}  # fmt: skip
    return recipe, tensors, timing


def psnr_fields(ref, imgs, prefix: str = "psnr") -> dict:
    psnr, lo, hi = metrics.paired_psnr_interval(ref, imgs, confidence=CONFIDENCE, resamples=RESAMPLES)
    return {f"{prefix}_db": psnr, f"{prefix}_lo": lo, f"{prefix}_hi": hi}


def image_fields(ref, imgs, num: int) -> dict:
    labels = [i % 10 for i in range(num)]
    return {**psnr_fields(ref, imgs), "fd": metrics.fd_to_real(imgs), "class_accuracy": metrics.class_accuracy(imgs, labels)}


def run(args, plan: list[tuple[str, int]], protocol: dict) -> None:
    torch.manual_seed(0)
    cache = Cache(args.cache)
    settings, heldout = CalibrationSettings(), CalibrationSettings(seed=args.heldout_seed)
    jobs = [(spec, p) for spec in args.methods for p in args.precisions]
    if args.floor is not None and args.floor not in jobs:
        jobs.append(args.floor)  # the floor compares against this recipe's torch row
    configs = {job: config_for(*job, settings) for job in jobs}  # every spec checked before any work
    base = load_model("builtin")
    base_batches = cache.recording(base, settings)

    def stressed():
        model, info = stress_variant(base, base_batches)
        atomic_write(cache.root / "stress_variant.json", lambda tmp: tmp.write_text(json.dumps(info, indent=1, default=str)))
        return model, cache.recording(model, settings)

    variants = {"builtin": lambda: (base, base_batches), "stress": stressed}
    for vname in args.models:
        model, batches = variants[vname]()
        eps = model.config.in_channels  # the output's first C channels are the noise prediction (learned variance after them)
        held = cache.recording(model, heldout)
        refs = {}
        for steps, num in plan:
            key = (vname, "float", "fp32", steps, f"n{num}", "torch")
            s0 = time.perf_counter()
            refs[steps] = ref = cache.samples(key, lambda: sample_images(model, steps, num))
            if cache.row(key, protocol) is None:
                row = {**_ident(key), **image_fields(ref, ref, num), "sample_seconds": round(time.perf_counter() - s0, 1)}
                cache.put_row({**row, "protocol": protocol}, key)
        if args.backend == "onnxruntime":
            refs = ort_float_rows(cache, vname, model, plan, refs, protocol)
            if args.fd_noise and cache.row(rkey := (vname, "float-reseed", "fp32", steps, f"n{num}", "torch"), protocol) is None:
                # the float model again with the next N seeds: how far FD moves by sampling noise alone
                other = sample_images(model, steps, num, first_seed=num)
                cache.put_row({**_ident(rkey), **image_fields(ref, other, num), "protocol": protocol}, rkey)
        for spec, precision in jobs:
            keys = {(steps, num): (vname, spec, precision, steps, f"n{num}", args.backend) for steps, num in plan}
            todo = [sn for sn, k in keys.items() if cache.row(k, protocol) is None]
            floor_keys = {sn: (*k[:-1], "floor") for sn, k in keys.items()} if (spec, precision) == args.floor and args.backend == "torch" else {}
            floor_todo = [sn for sn, k in floor_keys.items() if cache.row(k, protocol) is None]
            if not todo and not floor_todo:
                continue
            recipe, tensors, timing = timed_calibration(model, configs[spec, precision], batches)
            q = quantized_model(model, recipe, tensors)
            sqnr = metrics.sqnr_by_timestep(model, q, held, channels=eps)
            sha = tensors_sha256(tensors)[:12]
            common = {"deployable": recipe.deployable, "recipe_sha": sha, "float_layers": sorted(recipe.float_layers), **timing}
            log(f"{vname} {spec} {precision}: calibrated in {timing['calib_seconds']} s (load {timing['loadavg'][0]}), "
                f"SQNR mean {sqnr['mean_db']:.2f} dB, pooled {sqnr['pooled_db']:.2f} dB")  # fmt: skip
            if args.backend == "onnxruntime":
                if not recipe.deployable:
                    log(f"{vname} {spec} {precision}: simulation only, no ONNX Runtime row (run it with --backend torch)")
                    continue
                ort_rows(cache, model, recipe, tensors, held, refs, {sn: keys[sn] for sn in todo}, common, protocol)
                continue
            quant = {}
            for steps, num in todo + [sn for sn in floor_todo if sn not in todo]:
                s0 = time.perf_counter()
                quant[steps] = imgs = cache.samples((*keys[steps, num][:-1], sha), lambda: sample_images(q, steps, num))
                if (steps, num) in todo:
                    row = {**_ident(keys[steps, num]), **image_fields(refs[steps], imgs, num), "sqnr": sqnr, **common,
                           "sample_seconds": round(time.perf_counter() - s0, 1), "protocol": protocol}  # fmt: skip
                    cache.put_row(row, keys[steps, num])
                    log(f"{vname} {steps} {spec} {precision}: PSNR {row['psnr_db']:.2f} [{row['psnr_lo']:.2f}, {row['psnr_hi']:.2f}] dB ({row['sample_seconds']:.0f} s)")
            if floor_todo:
                floor_rows(cache, model, recipe, tensors, q, held, refs, quant, {sn: floor_keys[sn] for sn in floor_todo}, common, protocol)


@contextlib.contextmanager
def ort_denoiser(model, recipe=None, tensors=None):
    """``model`` (with ``recipe``: its quantized graph) exported to fp32 ONNX by the library's export
    entry point and opened in ONNX Runtime with this process's threads."""
    with tempfile.TemporaryDirectory(prefix="quality-ort-") as tmp:
        graph = export_model(model, Path(tmp) / "graph.onnx", recipe=recipe, tensors=tensors)
        with open_denoiser(graph, threads=torch.get_num_threads()) as ort:
            yield ort


def sample_ort(ort, steps: str, num: int, **kw) -> np.ndarray:
    return sample_images(ort, steps, num, device=ort.device, batch=min(512, ort.images_per_call(guided=True) or 512), **kw)


def ort_float_rows(cache, vname, model, plan, torch_refs, protocol) -> dict:
    """The float model's samples in ONNX Runtime (its exported fp32 graph): the reference of every
    ``--backend onnxruntime`` row, so those rows measure quantization alone, executed where it is
    deployed. Each row also holds the paired PSNR between the torch and ONNX Runtime float samples."""
    refs, ort = {}, None
    with contextlib.ExitStack() as stack:
        for steps, num in plan:
            key = (vname, "float", "fp32", steps, f"n{num}", "onnxruntime")
            if ort is None and (cache.row(key, protocol) is None or not cache._path(*key, ext="npy").exists()):
                ort = stack.enter_context(ort_denoiser(model))
            s0 = time.perf_counter()
            refs[steps] = ref = cache.samples(key, lambda: sample_ort(ort, steps, num))
            if cache.row(key, protocol) is None:
                row = {**_ident(key), **image_fields(ref, ref, num), **psnr_fields(torch_refs[steps], ref, "floor_psnr"),
                       "sample_seconds": round(time.perf_counter() - s0, 1), "protocol": protocol}  # fmt: skip
                cache.put_row(row, key)
                log(f"{vname} {steps} float in ONNX Runtime: {row['floor_psnr_db']:.2f} dB from the torch float samples")
    return refs


def ort_rows(cache, model, recipe, tensors, held, refs, keys, common, protocol) -> None:
    """A deployable recipe's rows executed by ONNX Runtime from its exported graph, against the float
    model's ONNX Runtime samples (``refs``); the one-step SQNR against the torch float model."""
    if not keys:
        return
    with ort_denoiser(model, recipe, tensors) as ort:
        sqnr = metrics.sqnr_by_timestep(model, ort, held, channels=model.config.in_channels)
        for (steps, num), key in keys.items():
            s0 = time.perf_counter()
            # the same sample file as the floor row of this recipe, when there is one
            imgs = cache.samples((*key[:-1], common["recipe_sha"], "onnxruntime"), lambda: sample_ort(ort, steps, num))
            row = {**_ident(key), **image_fields(refs[steps], imgs, num), "sqnr": sqnr, **common,
                   "sample_seconds": round(time.perf_counter() - s0, 1), "protocol": protocol}  # fmt: skip
            cache.put_row(row, key)
            log(f"{key[0]} {steps} {key[1]} {key[2]} in ONNX Runtime: PSNR {row['psnr_db']:.2f} [{row['psnr_lo']:.2f}, {row['psnr_hi']:.2f}] dB ({row['sample_seconds']:.0f} s)")


def floor_rows(cache, model, recipe, tensors, q, held, refs, quant, keys, common, protocol) -> None:
    """The floor recipe exported (fp32 ONNX, the library's export entry point) and sampled by ONNX
    Runtime: its rows against the torch float model and against the same recipe run by torch."""
    if not recipe.deployable:
        raise SystemExit(f"the noise floor needs a deployable recipe; {recipe.method} {recipe.precision} is simulation only: choose another --floor")
    eps = model.config.in_channels
    with ort_denoiser(model, recipe, tensors) as ort:
        sqnr = metrics.sqnr_by_timestep(model, ort, held, channels=eps)
        vs_torch = metrics.sqnr_by_timestep(q, ort, held, channels=eps)
        for (steps, num), key in keys.items():
            s0 = time.perf_counter()
            imgs = cache.samples((*key[:-1], common["recipe_sha"], "onnxruntime"), lambda: sample_ort(ort, steps, num))
            row = {**_ident(key), **image_fields(refs[steps], imgs, num), **psnr_fields(quant[steps], imgs, "floor_psnr"), "sqnr": sqnr,
                   "floor_sqnr": vs_torch, **common, "sample_seconds": round(time.perf_counter() - s0, 1), "protocol": protocol}  # fmt: skip
            cache.put_row(row, key)
            log(f"{key[0]} {steps} {key[1]} {key[2]} in ONNX Runtime: PSNR {row['psnr_db']:.2f} dB vs torch float, {row['floor_psnr_db']:.2f} dB vs torch")


def _ident(key: tuple) -> dict:
    model, method, precision, steps, num, backend = key
    return {"model": model, "method": method, "precision": precision, "steps": steps, "num": int(num[1:]), "backend": backend}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------- the table


def _order(rows: list[dict]) -> list[dict]:
    prec = {"fp32": 0, **{p: i + 1 for i, p in enumerate(PRECISIONS)}}
    methods = list(dict.fromkeys(["float", "float-reseed", *METHODS, *sorted(r["method"] for r in rows)]))
    return sorted(rows, key=lambda r: (MODELS.index(r["model"]) if r["model"] in MODELS else 9, -int(r["steps"]), r["num"],
                                       BACKENDS.index(r["backend"]), prec.get(r["precision"], 9), methods.index(r["method"])))  # fmt: skip


def ranks(rows: list[dict]) -> dict[int, int]:
    """Rank of each quantized row (by ``id``) among the rows of the same model, steps, N, precision and
    backend: 1 + the number of those rows whose PSNR interval lies wholly above its own. Rows whose
    intervals overlap are not told apart, so they can share a rank; ranks can skip. Floor rows are
    not ranked (their reference is another backend's float samples)."""
    group = lambda r: (r["model"], str(r["steps"]), r["num"], r["precision"], r["backend"])  # noqa: E731
    ranked = [r for r in rows if r["backend"] != "floor" and not r["method"].startswith("float")]
    return {id(r): 1 + sum(o["psnr_lo"] > r["psnr_hi"] for o in ranked if group(o) == group(r)) for r in ranked}


def markdown(results: dict, command: str) -> str:
    lines = [
        "# Quality of quantized recipes on the built-in model",
        "",
        (
            f"Generated by `{command}` (ditrt {results['ditrt_version']}, torch {results['torch']}, {results['machine']}). "
            "Do not edit by hand; rows are cached per (model, method, precision, steps, N, backend) and the table is rebuilt from the cache."
        ),
        "",
        (
            "N samples per row (labels cycling 0-9, seeds 0..N-1), cfg 1.5, DDPM; calibration: 25 steps of the 250-step run x 32 samples "
            f"(+ null class, seed 0). **PSNR** (primary): paired PSNR against the float model's samples with the same seeds, with its "
            f"{CONFIDENCE:.0%} percentile bootstrap interval over samples ({RESAMPLES} resamples of N whole samples, pooled MSE). "
            "**rank**: 1 + the number of rows (same model, steps, N, precision and backend) whose interval lies wholly above this row's; "
            "rows whose intervals overlap are not told apart and may share a rank. A `~` after the rank: the row's interval reaches "
            "the interval of its precision's noise floor (below), so its distance from float is no larger than what executing the same recipe on another "
            "backend changes; its rank need not carry over to deployment. "
            f"**SQNR** (one step): 10 log10(|eps_float|^2 / |eps_q - eps_float|^2) of the noise prediction (the first C output "
            f"channels; the learned variance is left out) on held-out inputs: 25 steps of float 250-step trajectories from seed "
            f"{results['heldout_seed']} (32 other samples and labels than calibration's), mean over the 25 timesteps and pooled "
            "(energies summed over all of them); per timestep in quality.json. "
            f"FD floor (two halves of the real digits, ~900 each): {results['fd_floor']:.2f}; FD of small N carries a small-sample "
            f"bias, so compare FDs within a (steps, N) block only (FD vs float is shown from N = {REL_FD_MIN_NUM}). "
            "**calib s**: the calibrate call alone on the recorded inputs (recording excluded), with the 1-minute load average "
            "of the machine right after it; `!` marks a load above this process's threads by more than 0.5, i.e. other jobs ran "
            "on the machine meanwhile: such wall times are not comparable with the others; the CPU seconds of the process are "
            "(at one thread they are the wall time the call takes alone, give or take the memory bandwidth other jobs took). "
            "Rows marked (sim) are simulation only (no TensorRT format): w4a8, asymmetric or dynamic activations. "
            "**(ONNX Runtime)** rows: the recipe's exported fp32 graph sampled by ONNX Runtime, against the float model's exported "
            "graph sampled by ONNX Runtime (so they measure quantization alone, executed where it is deployed; ranked among "
            "themselves); their one-step SQNR is against the torch float model. "
            "float-reseed: the float model with the next N seeds (FD spread from sampling noise alone)."
        ),
        "",
    ]
    rows, rank = results["rows"], ranks(results["rows"])
    for variant in dict.fromkeys(r["model"] for r in rows):
        lines += [f"## {variant}", ""]
        mine = [r for r in rows if r["model"] == variant]
        floors = {(str(r["steps"]), r["num"], r["precision"]): r for r in mine if r["backend"] == "floor"}
        lines += [_floor_line(f, mine) for f in floors.values()] or ["No noise-floor row measured (run with --floor)."]
        lines += [_float_line(r) for r in mine if r["method"] == "float" and r["backend"] == "onnxruntime"]
        lines += ["", "| steps | N | method | precision | PSNR dB [95% CI] | rank | SQNR mean / pooled dB | FD | FD vs float | class acc | calib s (CPU s, load) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        float_fd = {(str(r["steps"]), r["num"], r["backend"]): r["fd"] for r in mine if r["method"] == "float"}
        for r in mine:
            fd_ref = float_fd.get((str(r["steps"]), r["num"], "torch" if r["backend"] == "floor" else r["backend"]))
            lines.append(_table_row(r, rank.get(id(r)), floors.get((str(r["steps"]), r["num"], r["precision"])), fd_ref))
        lines.append("")
    return "\n".join(lines)


def _floor_line(f: dict, rows: list[dict]) -> str:
    torch_row = next((r for r in rows if (r["method"], r["precision"], r["backend"], r["steps"], r["num"]) ==
                      (f["method"], f["precision"], "torch", f["steps"], f["num"])), None)  # fmt: skip
    vs_float = "" if torch_row is None else f" (vs float: torch {_ci(torch_row)}, ONNX Runtime {_ci(f)})"
    return (
        f"- **noise floor, {f['steps']} steps, N = {f['num']}**: {f['method']} {f['precision']} run by torch vs by ONNX Runtime "
        f"(its exported fp32 graph): paired PSNR {_ci(f, 'floor_psnr')} dB between the two sample sets{vs_float}; one-step SQNR "
        f"{f['floor_sqnr']['mean_db']:.2f} / {f['floor_sqnr']['pooled_db']:.2f} dB (mean / pooled)."
    )


def _float_line(r: dict) -> str:
    return (
        f"- **float in ONNX Runtime, {r['steps']} steps, N = {r['num']}**: the float model's exported fp32 graph vs torch: "
        f"paired PSNR {_ci(r, 'floor_psnr')} dB. The ONNX Runtime rows below are measured against these samples."
    )


def _ci(r: dict, prefix: str = "psnr") -> str:
    return f"{r[f'{prefix}_db']:.2f} [{r[f'{prefix}_lo']:.2f}, {r[f'{prefix}_hi']:.2f}]"


def _table_row(r: dict, rank: int | None, floor: dict | None, float_fd: float | None) -> str:
    is_float = r["method"].startswith("float")
    method = r["method"] + {"torch": "", "onnxruntime": " (ONNX Runtime)", "floor": " (floor: ONNX Runtime vs torch float)"}[r["backend"]]
    psnr = "ref" if r["method"] == "float" else "-" if is_float else _ci(r)
    near = floor is not None and rank is not None and r["psnr_hi"] >= floor["floor_psnr_lo"]
    rank_s = "-" if rank is None else f"{rank}{'~' if near else ''}"
    sqnr = f"{r['sqnr']['mean_db']:.2f} / {r['sqnr']['pooled_db']:.2f}" if "sqnr" in r else "-"
    fd_rel = f"{100 * (r['fd'] / float_fd - 1):+.1f}%" if r["num"] >= REL_FD_MIN_NUM and float_fd else "-"
    prec = r["precision"] + ("" if is_float or r.get("deployable", True) else " (sim)")
    calib = "-"
    if r.get("calib_seconds") is not None and r["backend"] != "floor":  # the floor row shares its torch row's calibration
        load = r["loadavg"][0]
        cpu = f"{r['calib_cpu_seconds']} CPU, " if r.get("calib_cpu_seconds") is not None else ""
        calib = f"{r['calib_seconds']} ({cpu}{load:.1f}{'!' if load > r['threads'] + 0.5 else ''})"
    return f"| {r['steps']} | {r['num']} | {method} | {prec} | {psnr} | {rank_s} | {sqnr} | {r['fd']:.2f} | {fd_rel} | {r['class_accuracy']:.3f} | {calib} |"


# ----------------------------------------------------------------------------------- command line


def _words(values: list[str]) -> list[str]:
    return [w for v in values for w in v.split(",") if w]


def parse_plan(nums: list[str], steps: list[str] | None) -> list[tuple[str, int]]:
    """``[(steps, N)]`` from ``--num`` (one N, or STEPS=N pairs) and ``--steps``."""
    per, bare = {}, None
    for w in _words(nums):
        k, _, v = w.rpartition("=")
        if not v.isdigit() or int(v) < 2:
            raise SystemExit(f"--num takes N or STEPS=N with N >= 2 (FD needs 2 samples), got {w!r}")
        if k:
            per[k] = int(v)
        else:
            bare = int(v)
    steps = _words(steps) if steps else list(per) if per else ["250", "50"]
    missing = [s for s in steps if s not in per and bare is None]
    if missing:
        raise SystemExit(f"no --num for {', '.join(missing)} steps; add {missing[0]}=N or one N for all")
    return [(s, per.get(s, bare)) for s in steps]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num", nargs="+", default=["250=64", "50=256"], help="N for every --steps, or STEPS=N per step count")
    p.add_argument("--steps", nargs="+", default=None, help="step counts [default: those of --num, else 250 50]")
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS))
    p.add_argument("--backend", choices=("torch", "onnxruntime"), default="torch",
                   help="sample the rows with the torch simulation, or in ONNX Runtime from the exported graphs (deployable recipes; ~4x faster)")
    p.add_argument("--floor", default="minmax:w8a8", help="METHOD:PRECISION run in ONNX Runtime for the noise floor, or none")
    p.add_argument("--heldout-seed", type=int, default=1, help="seed of the held-out SQNR inputs (calibration records seed 0)")
    p.add_argument("--cache", type=Path, default=Path("runs/quality-cache"))
    p.add_argument("--out", type=Path, default=Path("docs/results"))
    p.add_argument("--table-only", action="store_true", help="rebuild the table from the cache without measuring")
    p.add_argument("--fd-noise", action="store_true", help="also sample the float model with seeds N..2N-1 (FD spread)")
    args = p.parse_args()
    plan = parse_plan(args.num, args.steps)
    args.models, args.methods, args.precisions = _words(args.models), _words(args.methods), _words(args.precisions)
    for what, values, known in (("--models", args.models, MODELS), ("--precisions", args.precisions, PRECISIONS)):
        if set(values) - set(known):
            raise SystemExit(f"{what}: unknown {', '.join(sorted(set(values) - set(known)))}; choose from {', '.join(known)}")
    if args.heldout_seed == CalibrationSettings().seed:
        raise SystemExit(f"--heldout-seed must differ from the calibration seed {CalibrationSettings().seed}: held-out inputs are not calibration inputs")
    args.floor = None if args.floor == "none" else tuple(args.floor.rsplit(":", 1))
    if args.floor is not None and (len(args.floor) != 2 or args.floor[1] not in PRECISIONS):
        raise SystemExit(f"--floor takes METHOD:PRECISION (e.g. minmax:w8a8) or none, got {':'.join(args.floor)}")
    protocol = {"calibration": dataclasses.asdict(CalibrationSettings()), "heldout": dataclasses.asdict(CalibrationSettings(seed=args.heldout_seed)),
                "cfg_scale": CFG_SCALE, "confidence": CONFIDENCE, "resamples": RESAMPLES}  # fmt: skip
    if not args.table_only:
        run(args, plan, protocol)
    results = {
        "plan": [{"steps": s, "num": n} for s, n in plan], "ditrt_version": __version__, "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads", "fd_floor": metrics.fd_floor(),
        "heldout_seed": args.heldout_seed, "protocol": protocol, "rows": _order(Cache(args.cache).rows(plan, protocol)),
    }  # fmt: skip
    stress = Cache(args.cache).root / "stress_variant.json"
    if any(r["model"] == "stress" for r in results["rows"]) and stress.exists():
        results["stress_variant"] = json.loads(stress.read_text())  # the injected channels and factors (docs/stress-variant.md)
    num = " ".join(f"{s}={n}" for s, n in plan)
    command = f"python bench/quality_table.py --num {num}{' --fd-noise' if args.fd_noise else ''}  # run in parts with --models/--methods/--precisions, then --table-only"
    text = markdown(results, command)
    atomic_write(args.out / "quality.json", lambda tmp: tmp.write_text(json.dumps(results, indent=2, default=str)))
    atomic_write(args.out / "quality.md", lambda tmp: tmp.write_text(text))
    print(text)


if __name__ == "__main__":
    main()
