"""Sensitive-layer float fallback under a quality budget: which quantized layers to leave in float.

:func:`choose_float_layers` takes a calibrated recipe and returns it with its most sensitive layers left
in float (:attr:`ditrt.contracts.recipe.Recipe.float_layers`: not in ``layers``, so the simulation and
the export leave them float), until a short paired probe reaches ``min_psnr`` or ``max_float_layers``
layers are float.

Two measures, both against the recipe's float model (its ``model.*`` tensors, balancing folded, with
every layer's float pre-rounding weight: it computes what the original model computes):

- **sensitivity** of layer L on one step, from the one-step error: the relative squared error of the
  noise prediction (the first ``in_channels`` output channels, the eps the sampler guides; the variance
  channels are not counted), ``sum |eps_q - eps_f|^2 / sum |eps_f|^2`` pooled over held-out inputs
  recorded along float trajectories of the probe seed (:func:`record_calibration_inputs`,
  ``sensitivity_batches`` steps of ``probe_samples`` samples, each call holding the conditional and the
  null-class rows). ``sensitivity="alone"`` (the default): the one-step error of the recipe with only L
  quantized, what L costs by itself; ``"removal"``: what leaving only L float buys, the error of the full
  recipe minus that with L float. They differ where the layers' errors cancel: on the built-in model at
  W4A16 (min-max) the layer whose removal helps least (blocks.3.mlp.fc2, removal -1.5e-4: leaving it
  float *raises* the error) costs 6.3e-5 alone, 7th of 24, and a 38 dB budget takes 11 layers ranked
  "alone" against 16 ranked by "removal". Each layer also gets an SQNR gain in dB,
  ``10 log10(error_full / error_without_L)``: measured ("removal"), or what leaving L float would buy if
  the errors added up, ``error_without_L = error_full - error_alone`` ("alone"). Layers are ranked by
  sensitivity.
- **probe**: ``probe_samples`` samples of a ``probe_steps`` DDPM run (seeds ``probe_seed + i``, labels
  cycling over the classes) from the float and the quantized model, compared by
  :func:`ditrt.quality.metrics.paired_psnr` on what the model outputs: pixels in [-1, 1] for a
  pixel-space model (the built-in one), VAE latents for a latent model (no VAE is run; the data range
  is then the float latents' peak-to-peak, ``2 max |x|``, so that no latent is clipped: such a PSNR is
  not comparable with one on decoded images).

Greedy in decreasing sensitivity, one layer at a time, until a probe meets the budget. Probes are
saved where the one-step error of the current set (one cheap pass) predicts a PSNR clearly short of the
budget: the prediction is the last probe's PSNR plus a slope times the one-step SQNR gained since, the
slope fitted to the probes so far (on the built-in model a dB of one-step SQNR buys about 0.3 dB of
probe PSNR); a probe is skipped while the prediction is more than :data:`SKIP_MARGIN_DB` short, at most
:data:`MAX_SKIPS` steps in a row, and the skipped steps just before the first probe that meets the
budget are probed afterwards, from the top down, so the answer is the smallest probed prefix that
meets it. Every returned set was probed; the probe is noisy (16 samples: the PSNR of a prefix is not
monotone in its length), so the budget holds for this probe, not for every sample set.

All work runs on ``device`` in one working copy of the model: layers are switched between their
simulated-quantized module and a float ``nn.Linear`` in place. Cost for DiT-XL/2 (112 quantized
Linears, 675M parameters): one model copy (2.7 GB float32) and during the float passes the float
weights of the switched layers (up to another 2.7 GB); one float recording run and one float probe;
then 113 one-step passes over ``sensitivity_batches`` batches of ``2 * probe_samples`` rows (8 x 32 rows:
about 29 000 image evaluations, some 18 probes' worth), plus per greedy step one such pass and at most
one probe (50 steps x 32 rows = 1 600 image evaluations). The recorded inputs stay on the CPU.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ditrt.contracts.errors import ArtifactError, ConfigError
from ditrt.contracts.recipe import CalibrationSettings, Recipe
from ditrt.diffusion.recording import CalibBatch, record_calibration_inputs
from ditrt.diffusion.sample_set import default_labels, generate
from ditrt.diffusion.sampler import SamplerConfig
from ditrt.models.quantized import QuantLinear, quantized_model, set_module
from ditrt.quality.metrics import paired_psnr

log = logging.getLogger(__name__)

#: A probe is skipped while the PSNR its one-step error predicts is this far below the budget ...
SKIP_MARGIN_DB = 1.0
#: ... but never more than this many steps in a row.
MAX_SKIPS = 3
#: How a layer's sensitivity is measured (both on one step, against the float model): "removal", what
#: leaving only L float buys (error of the full recipe minus that with L float); "alone", the error of the
#: recipe with only L quantized. They differ where layers' errors cancel (see the module doc).
SENSITIVITIES = ("removal", "alone")
#: Rows per model call in the one-step passes (bounds the activation memory).
EVAL_ROWS = 32


@dataclass(frozen=True)
class FallbackSettings:
    """The budget (``min_psnr`` dB of probe PSNR, at most ``max_float_layers`` float layers; either or
    both) and the probe: ``probe_samples`` samples of a ``probe_steps`` schedule at ``probe_cfg_scale``
    from seed ``probe_seed`` (not calibration's), and ``sensitivity_batches`` recorded steps for the
    one-step sensitivity, measured as ``sensitivity`` says (:data:`SENSITIVITIES`)."""

    min_psnr: float | None = None
    max_float_layers: int | None = None
    probe_samples: int = 16
    probe_steps: str = "50"
    probe_cfg_scale: float = 1.5
    probe_seed: int = 1000
    sensitivity_batches: int = 8
    sensitivity: str = "alone"  # SENSITIVITIES

    def __post_init__(self):
        if self.min_psnr is not None and not (0 < self.min_psnr < 200):
            raise ConfigError(f"--min-psnr is a paired PSNR in dB and must lie in (0, 200), got {self.min_psnr}")
        if self.max_float_layers is not None and self.max_float_layers < 0:
            raise ConfigError(f"--max-float-layers must be 0 or more, got {self.max_float_layers}")
        if self.probe_samples < 1 or self.sensitivity_batches < 1:
            raise ConfigError(f"the fallback probe needs at least 1 sample and 1 batch, got {self.probe_samples} and {self.sensitivity_batches}")
        SamplerConfig(steps=self.probe_steps, cfg_scale=self.probe_cfg_scale)  # validates both
        if self.sensitivity not in SENSITIVITIES:
            raise ConfigError(f"the layer sensitivity must be one of {', '.join(SENSITIVITIES)}, got {self.sensitivity!r}")

    @property
    def active(self) -> bool:
        return self.min_psnr is not None or self.max_float_layers is not None


def choose_float_layers(model: nn.Module, recipe: Recipe, tensors: dict, float_weights: dict[str, torch.Tensor],
                        settings: FallbackSettings, *, device="cpu", progress: bool = False) -> tuple[Recipe, dict, dict]:  # fmt: skip
    """Leave the most sensitive of ``recipe``'s layers in float until ``settings``' budget is met.

    ``model``: the original float model (left untouched); ``recipe``/``tensors``: the calibrated recipe
    (its ``model.L.weight`` may be GPTQ- or reconstruction-rounded); ``float_weights``: layer -> the float
    (balanced, pre-rounding) weight a float layer gets back; a layer missing from it keeps
    ``model.L.weight`` of ``tensors``, which only a round-to-nearest, unreconstructed recipe allows.
    Returns the new recipe (``layers`` without the float ones, ``float_layers`` = {layer: {sensitivity,
    sqnr_gain_db, rank}}, ``details["fallback"]``), the new tensors (``quant.L.*`` of float layers dropped,
    ``model.L.weight`` restored) and the report (``details["fallback"]``: budget, probe, every step's
    probe PSNR, ``met``, ``seconds``). With ``max_float_layers`` alone: exactly the N most sensitive."""
    start = time.time()
    weights = _float_weights(recipe, tensors, float_weights, settings)
    pixel = model.config.pixel_space
    model.config.check_guidance(settings.probe_cfg_scale, "the model")
    switch = _Switch(quantized_model(model, recipe, tensors).to(device), weights)
    switch.set_float(recipe.layers)  # the recipe's float model
    held_out = _record(switch.model, settings, pixel, device, progress)
    refs = _outputs(switch.model, held_out, device)
    ref_probe = _probe(switch.model, settings, pixel, device)
    measure = _Measure(switch, held_out, refs, ref_probe, settings, pixel, device)
    full_psnr = measure.psnr(())
    limit = len(recipe.layers) if settings.max_float_layers is None else min(settings.max_float_layers, len(recipe.layers))
    needed = settings.min_psnr is None or full_psnr < settings.min_psnr
    # no layer is measured when none will be float
    ranking = _rank(measure, recipe.layers, settings.sensitivity, progress) if needed and limit else []
    chosen, steps, met, psnr = _budget(measure, ranking[:limit], full_psnr, settings, progress)
    rec = {r["layer"]: {"sensitivity": r["sensitivity"], "sqnr_gain_db": r["sqnr_gain_db"], "rank": k + 1}
           for k, r in enumerate(ranking) if r["layer"] in chosen}  # fmt: skip
    report = {
        "budget": {"min_psnr": settings.min_psnr, "max_float_layers": settings.max_float_layers},
        "probe": {"samples": settings.probe_samples, "steps": settings.probe_steps, "cfg_scale": settings.probe_cfg_scale,
                  "seed": settings.probe_seed, "measured_on": "pixels" if pixel else "latents",
                  "data_range": measure.data_range},
        "sensitivity": {"kind": settings.sensitivity, "batches": settings.sensitivity_batches,
                        "measure": "relative squared error of the noise prediction "
                        f"(first {model.config.in_channels} output channels) against the float model, pooled over held-out inputs",
                        "one_step_error_full": measure.full_error},
        "ranking": ranking, "steps": steps, "float_layers": list(rec), "psnr_full_db": steps[0]["probe_psnr_db"],
        "psnr_db": psnr, "met": met, "seconds": round(time.time() - start, 2),
    }  # fmt: skip
    log.info("float fallback: %d layers left in float, probe PSNR %.2f -> %.2f dB (%s) in %.1f s", len(rec),
             report["psnr_full_db"], report["psnr_db"], "met" if met else "budget not met", report["seconds"])  # fmt: skip
    new_recipe, new_tensors = _apply(recipe, tensors, weights, rec, report)
    return new_recipe, new_tensors, report


def _float_weights(recipe: Recipe, tensors: dict, float_weights: dict, settings: FallbackSettings) -> dict:
    """Every recipe layer's float weight (CPU), checked before any work."""
    if not settings.active:
        raise ConfigError("the float fallback needs a budget: pass --min-psnr DB or --max-float-layers N")
    unknown = sorted(set(float_weights) - set(recipe.layers))
    if unknown:
        raise ConfigError(f"float weights given for {unknown[0]}, which the recipe does not quantize; pass weights of recipe layers only")
    rewritten = recipe.weight_rounding != "rtn" or recipe.reconstructed
    out = {}
    for name in recipe.layers:
        key = f"model.{name}.weight"
        if key not in tensors:
            raise ArtifactError(f"recipe tensors lack {key} (the folded float state); re-run `ditrt calibrate`")
        if name not in float_weights and rewritten:
            how = "reconstructed" if recipe.reconstructed else recipe.weight_rounding
            raise ConfigError(f"the recipe's {how} weights are rounded: pass the float weight of {name} (and every layer) in float_weights")
        w = float_weights.get(name, tensors[key])
        if tuple(w.shape) != tuple(tensors[key].shape):
            raise ConfigError(f"the float weight of {name} has shape {tuple(w.shape)}, the layer {tuple(tensors[key].shape)}; "
                              "pass that layer's weight")
        out[name] = w.detach().cpu()
    return out


class _Switch:
    """One simulated model whose layers switch in place between their QuantLinear and a float Linear."""

    def __init__(self, qmodel: nn.Module, weights: dict):
        self.model, self.weights = qmodel, weights
        self.quant = {n: qmodel.get_submodule(n) for n in weights}
        self.floats: set[str] = set()

    def set_float(self, layers) -> None:
        """Exactly ``layers`` float, every other recipe layer quantized."""
        layers = set(layers)
        for name in self.floats - layers:
            set_module(self.model, name, self.quant[name])
        for name in layers - self.floats:
            set_module(self.model, name, self._linear(name))
        self.floats = layers

    def _linear(self, name: str) -> nn.Linear:
        q: QuantLinear = self.quant[name]
        lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device=q.weight.device, dtype=q.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.weights[name])
            if q.bias is not None:
                lin.bias.copy_(q.bias)
        return lin.eval().requires_grad_(False)


def _record(model, settings: FallbackSettings, pixel: bool, device, progress: bool) -> list[CalibBatch]:
    held_out = CalibrationSettings(steps=settings.probe_steps, timesteps=settings.sensitivity_batches, samples=settings.probe_samples,
                                   cfg_scale=settings.probe_cfg_scale, seed=settings.probe_seed)  # fmt: skip
    return record_calibration_inputs(model, held_out, device=str(device), pixel_space=pixel, progress=progress)


def _outputs(model, batches: list[CalibBatch], device) -> list[torch.Tensor]:
    """The noise predictions (first ``in_channels`` channels) on each batch, on the CPU."""
    c = model.config.in_channels
    out = []
    with torch.no_grad():
        for x, t, y in batches:
            parts = [model(x[r].to(device), t[r].to(device), y[r].to(device))[:, :c].cpu() for r in _slices(len(x))]
            out.append(torch.cat(parts))
    return out


def _slices(n: int) -> list[slice]:
    return [slice(s, s + EVAL_ROWS) for s in range(0, n, EVAL_ROWS)]


def _probe(model, settings: FallbackSettings, pixel: bool, device) -> np.ndarray:
    cfg, n = model.config, settings.probe_samples
    labels = default_labels(n, cfg.num_classes)
    seeds = [settings.probe_seed + i for i in range(n)]
    sampler = SamplerConfig(steps=settings.probe_steps, cfg_scale=settings.probe_cfg_scale, clip_denoised=pixel)
    return generate(model, sampler, labels, seeds, num_classes=cfg.num_classes, batch_size=64,
                    image_shape=(cfg.in_channels, cfg.input_size, cfg.input_size), device=str(device))  # fmt: skip


class _Measure:
    """One-step error and probe PSNR of a set of float layers, against the float references."""

    def __init__(self, switch: _Switch, batches, refs, ref_probe, settings, pixel: bool, device):
        self.switch, self.batches, self.refs, self.ref_probe = switch, batches, refs, ref_probe
        self.settings, self.pixel, self.device = settings, pixel, device
        self.data_range = 2.0 if pixel else 2.0 * float(np.abs(ref_probe).max())
        self.ref_energy = sum(float(r.double().pow(2).sum()) for r in refs)
        self.full_error = self.one_step(())

    def one_step(self, floats) -> float:
        """Pooled relative squared error of the noise prediction with ``floats`` left float."""
        self.switch.set_float(floats)
        outs = _outputs(self.switch.model, self.batches, self.device)
        return sum(float((o.double() - r.double()).pow(2).sum()) for o, r in zip(outs, self.refs)) / max(self.ref_energy, 1e-30)

    def psnr(self, floats) -> float:
        self.switch.set_float(floats)
        return paired_psnr(self.ref_probe, _probe(self.switch.model, self.settings, self.pixel, self.device), data_range=self.data_range)


def _rank(measure: _Measure, layers, kind: str, progress: bool) -> list[dict]:
    """Every layer's sensitivity (:data:`SENSITIVITIES`) and SQNR gain, most sensitive first (ties in recipe
    order); ``one_step_error``: the error measured, with L float ("removal") or only L quantized ("alone")."""
    items = layers
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(layers, desc=f"fallback: one-step sensitivity of each layer ({kind})", unit="layer")
    full, rows = measure.full_error, []
    for name in items:
        if kind == "removal":
            err = measure.one_step((name,))
            sens, rest = full - err, err
        else:  # the error L alone adds; the gain is what leaving it float would buy if errors added up
            err = measure.one_step(tuple(n for n in layers if n != name))
            sens, rest = err, full - err
        gain = 10 * math.log10(full / rest) if rest > 0 and full > 0 else math.inf
        rows.append({"layer": name, "sensitivity": sens, "sqnr_gain_db": min(gain, 200.0), "one_step_error": err})
    order = sorted(range(len(rows)), key=lambda i: (-rows[i]["sensitivity"], i))
    return [rows[i] for i in order]


def _budget(measure: _Measure, candidates: list[dict], full_psnr: float, settings: FallbackSettings,
            progress: bool) -> tuple[list[str], list[dict], bool, float]:  # fmt: skip
    """The chosen float layers (a prefix of ``candidates``, most sensitive first), the steps' records
    (step 0 the full recipe; with ``min_psnr`` ``steps[k]`` has k layers float, None where its probe was
    skipped), whether the budget is met and the chosen set's probe PSNR."""
    order = [r["layer"] for r in candidates]
    steps = [{"float_layers": 0, "layer": None, "one_step_error": measure.full_error, "predicted_psnr_db": None, "probe_psnr_db": full_psnr}]
    if settings.min_psnr is None:  # a count alone: exactly the N most sensitive, verified by one probe
        if order:
            steps.append({"float_layers": len(order), "layer": order[-1], "one_step_error": measure.one_step(order),
                          "predicted_psnr_db": None, "probe_psnr_db": measure.psnr(order)})  # fmt: skip
        return order, steps, True, steps[-1]["probe_psnr_db"]
    budget, bar = settings.min_psnr, None
    if progress and order and full_psnr < budget:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(order), desc=f"fallback: layers left float for {budget:g} dB", unit="layer")
    last = k = 0  # the last probed step, the current one
    while steps[last]["probe_psnr_db"] < budget and k < len(order):
        k += 1
        err = measure.one_step(order[:k])
        predicted = _predicted_psnr(steps, last, err)
        probe = k == len(order) or k - last > MAX_SKIPS or predicted >= budget - SKIP_MARGIN_DB
        steps.append({"float_layers": k, "layer": order[k - 1], "one_step_error": err, "predicted_psnr_db": predicted,
                      "probe_psnr_db": measure.psnr(order[:k]) if probe else None})  # fmt: skip
        last = k if probe else last
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"{order[k - 1]}: {steps[last]['probe_psnr_db']:.2f} dB")
    if bar is not None:
        bar.close()
    met = steps[last]["probe_psnr_db"] >= budget
    while met and last > 1 and steps[last - 1]["probe_psnr_db"] is None:  # back-fill the probes skipped before the crossing
        steps[last - 1]["probe_psnr_db"] = measure.psnr(order[: last - 1])
        if steps[last - 1]["probe_psnr_db"] < budget:
            break
        last -= 1
    return order[:last], steps, met, steps[last]["probe_psnr_db"]


def _predicted_psnr(steps: list[dict], last: int, err: float) -> float:
    """The probe PSNR that one-step error ``err`` predicts: the last probe's plus ``slope * 10 log10(err_last / err)``,
    the slope (dB of probe per dB of one-step SQNR, in [0.1, 1]) fitted through the full recipe's point to the probes so far."""
    p0, e0 = steps[0]["probe_psnr_db"], steps[0]["one_step_error"]
    pts = [(10 * math.log10(e0 / s["one_step_error"]), s["probe_psnr_db"] - p0) for s in steps[1:]
           if s["probe_psnr_db"] is not None and 0 < s["one_step_error"] < e0]  # fmt: skip
    sxx = sum(x * x for x, _ in pts)
    slope = min(1.0, max(0.1, sum(x * y for x, y in pts) / sxx)) if sxx > 0 else 1.0
    if err <= 0:
        return 200.0
    return min(200.0, steps[last]["probe_psnr_db"] + slope * 10 * math.log10(steps[last]["one_step_error"] / err))


def _apply(recipe: Recipe, tensors: dict, weights: dict, records: dict, report: dict) -> tuple[Recipe, dict]:
    """The recipe and tensors with ``records``' layers float: out of ``layers`` and ``runtime_smoothed``,
    their ``quant.L.*`` dropped and their float weight back in ``model.L.weight``."""
    prefixes = tuple(f"quant.{n}." for n in records)
    new = {k: v for k, v in tensors.items() if not k.startswith(prefixes)}
    for name in records:
        key = f"model.{name}.weight"
        new[key] = weights[name].to(tensors[key].dtype)
    notes = recipe.notes
    if not report["met"]:
        notes += (f"float fallback: the {report['budget']['min_psnr']:g} dB probe budget was not met with {len(records)} layers "
                  f"left in float (reached {report['psnr_db']:.2f} dB)",)  # fmt: skip
    new_recipe = dataclasses.replace(
        recipe, notes=notes, layers=tuple(n for n in recipe.layers if n not in records), float_layers={**recipe.float_layers, **records},
        runtime_smoothed=tuple(n for n in recipe.runtime_smoothed if n not in records), details={**recipe.details, "fallback": report},
    )  # fmt: skip
    return new_recipe, new
