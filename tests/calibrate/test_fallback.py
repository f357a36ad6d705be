"""The float fallback on a tiny random latent DiT (8 quantized Linears) at W4A16, with a small probe.

Every budget is checked by re-measuring the probe here, from the returned recipe and tensors alone."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from ditrt.calibrate.fallback import MAX_SKIPS, SENSITIVITIES, FallbackSettings, _budget, choose_float_layers
from ditrt.calibrate.ptq import CalibrateConfig, calibrate
from ditrt.contracts.errors import ConfigError
from ditrt.contracts.quantizers import fake_quant_weight
from ditrt.contracts.recipe import CalibrationSettings, Recipe, load_recipe, save_recipe
from ditrt.diffusion.recording import record_calibration_inputs
from ditrt.diffusion.sample_set import generate
from ditrt.diffusion.sampler import SamplerConfig
from ditrt.models.quantized import quantized_model
from ditrt.quality.metrics import paired_psnr
from tests.conftest import TINY, random_dit

PROBE = FallbackSettings(probe_samples=4, probe_steps="10", sensitivity_batches=2)
CALIB = CalibrationSettings(steps="10", timesteps=3, samples=4)


@pytest.fixture(scope="module")
def case():
    """The model, its W4A16 min-max round-to-nearest recipe, the recipe's float weights, and the full recipe's probe PSNR."""
    model = random_dit(TINY, std=0.08)
    batches = record_calibration_inputs(model, CALIB)
    config = CalibrateConfig(method="minmax", precision="w4a16", weights="rtn", calibration=CALIB)  # round to nearest: float weights in model.*
    recipe, tensors = calibrate(model, config, batches)
    weights = {n: tensors[f"model.{n}.weight"] for n in recipe.layers}
    return model, recipe, tensors, weights, probe_psnr(model, recipe, tensors)


def probe_samples(model, recipe, tensors) -> np.ndarray:
    """The probe's samples: seeds 1000 + i, labels 0, 1, ... of a 10-step DDPM run (latents)."""
    n = PROBE.probe_samples
    q = quantized_model(model, recipe, tensors)
    sampler = SamplerConfig(steps=PROBE.probe_steps, cfg_scale=PROBE.probe_cfg_scale)
    return generate(q, sampler, [i % 10 for i in range(n)], [1000 + i for i in range(n)], num_classes=10, image_shape=(4, 8, 8))


def probe_psnr(model, recipe, tensors) -> float:
    """Paired PSNR of the recipe's samples against its float model's (no layer quantized), latents at their peak range."""
    ref = probe_samples(model, dataclasses.replace(recipe, layers=()), tensors)
    return paired_psnr(ref, probe_samples(model, recipe, tensors), data_range=2 * float(np.abs(ref).max()))


def check_float_layers(recipe: Recipe, tensors: dict, new: Recipe, new_tensors: dict, weights: dict) -> None:
    """Float layers: out of ``layers`` with a sensitivity record, no quant.* left, their float weight back."""
    assert set(new.float_layers).isdisjoint(new.layers)
    assert set(new.layers) | set(new.float_layers) == set(recipe.layers)
    for name, rec in new.float_layers.items():
        assert set(rec) == {"sensitivity", "sqnr_gain_db", "rank"}
        assert not [k for k in new_tensors if k.startswith(f"quant.{name}.")]
        assert torch.equal(new_tensors[f"model.{name}.weight"], weights[name])
    for name in new.layers:
        assert new_tensors[f"quant.{name}.weight_scale"] is tensors[f"quant.{name}.weight_scale"]
    new.validate()


def test_budget_met_where_the_full_recipe_misses_it(case, tmp_path):
    model, recipe, tensors, weights, full = case
    budget = full + 4.0
    new, new_tensors, report = choose_float_layers(model, recipe, tensors, weights, dataclasses.replace(PROBE, min_psnr=budget))
    assert report["met"] and report is new.details["fallback"]
    assert report["psnr_full_db"] == pytest.approx(full, abs=1e-6) and full < budget
    assert 1 <= len(new.float_layers) < len(recipe.layers)
    remeasured = probe_psnr(model, new, new_tensors)
    assert remeasured >= budget and remeasured == pytest.approx(report["psnr_db"], abs=1e-6)
    # greedy: the chosen prefix is the first probed one that meets the budget, layers in decreasing sensitivity
    n = len(new.float_layers)
    assert report["steps"][n]["probe_psnr_db"] == report["psnr_db"]
    assert all(s["probe_psnr_db"] < budget for s in report["steps"][:n] if s["probe_psnr_db"] is not None)
    assert [r["layer"] for r in report["ranking"][: len(new.float_layers)]] == list(new.float_layers)
    sens = [r["sensitivity"] for r in report["ranking"]]
    assert sens == sorted(sens, reverse=True)
    check_float_layers(recipe, tensors, new, new_tensors, weights)
    save_recipe(new, new_tensors, tmp_path / "r")  # the record survives the recipe file
    loaded, _ = load_recipe(tmp_path / "r")
    assert loaded.float_layers == new.float_layers and loaded.layers == new.layers


@pytest.mark.parametrize("kind", SENSITIVITIES)
def test_max_float_layers_alone_leaves_the_n_most_sensitive(case, kind):
    model, recipe, tensors, weights, _ = case
    settings = dataclasses.replace(PROBE, max_float_layers=3, sensitivity=kind)
    new, new_tensors, report = choose_float_layers(model, recipe, tensors, weights, settings)
    ranking = report["ranking"]
    assert list(new.float_layers) == [r["layer"] for r in ranking[:3]] and len(ranking) == len(recipe.layers)
    assert [new.float_layers[r["layer"]]["rank"] for r in ranking[:3]] == [1, 2, 3]
    assert min(r["sensitivity"] for r in ranking[:3]) >= max(r["sensitivity"] for r in ranking[3:])
    # the most and the least sensitive layer's sensitivity, re-measured: one-step error of the noise prediction
    held_out = record_calibration_inputs(
        quantized_model(model, dataclasses.replace(recipe, layers=()), tensors),
        CalibrationSettings(steps="10", timesteps=2, samples=4, seed=1000),
    )
    for row in (ranking[0], ranking[-1]):
        others = tuple(n for n in recipe.layers if n != row["layer"])
        if kind == "removal":  # what leaving only L float buys
            without = dataclasses.replace(recipe, layers=others)
            sens = one_step_error(model, recipe, tensors, held_out) - one_step_error(model, without, tensors, held_out)
        else:  # the error of L quantized alone
            sens = one_step_error(model, dataclasses.replace(recipe, layers=(row["layer"],)), tensors, held_out)
        assert sens == pytest.approx(row["sensitivity"], rel=1e-4, abs=1e-9)
    assert ranking[0]["sensitivity"] > 0 and ranking[0]["sqnr_gain_db"] > 0 and report["sensitivity"]["kind"] == kind
    assert report["met"] and probe_psnr(model, new, new_tensors) == pytest.approx(report["psnr_db"], abs=1e-6)
    check_float_layers(recipe, tensors, new, new_tensors, weights)


def one_step_error(model, recipe, tensors, batches) -> float:
    ref, q = quantized_model(model, dataclasses.replace(recipe, layers=()), tensors), quantized_model(model, recipe, tensors)
    with torch.no_grad():
        pairs = [(ref(x, t, y)[:, :4].double(), q(x, t, y)[:, :4].double()) for x, t, y in batches]
    return float(sum((b - a).pow(2).sum() for a, b in pairs) / sum(a.pow(2).sum() for a, _ in pairs))


def test_a_budget_beyond_the_limit_says_it_was_not_met(case):
    model, recipe, tensors, weights, full = case
    settings = dataclasses.replace(PROBE, min_psnr=199.0, max_float_layers=2)
    new, new_tensors, report = choose_float_layers(model, recipe, tensors, weights, settings)
    assert not report["met"] and len(new.float_layers) == 2
    assert report["psnr_db"] == pytest.approx(probe_psnr(model, new, new_tensors), abs=1e-6) and report["psnr_db"] < 199.0
    assert report["steps"][-1]["probe_psnr_db"] == report["psnr_db"] and report["psnr_full_db"] == pytest.approx(full, abs=1e-6)
    assert any("not met" in n and f"{report['psnr_db']:.2f}" in n for n in new.notes)


def test_a_budget_the_full_recipe_meets_leaves_every_layer_quantized(case):
    model, recipe, tensors, weights, full = case
    new, new_tensors, report = choose_float_layers(model, recipe, tensors, weights, dataclasses.replace(PROBE, min_psnr=full - 1.0))
    assert report["met"] and not new.float_layers and new.layers == recipe.layers
    assert new_tensors.keys() == tensors.keys() and report["ranking"] == []  # nothing measured that is not needed
    assert report["psnr_db"] == pytest.approx(full, abs=1e-6)


def test_rounded_weights_are_replaced_by_the_float_ones(case):
    """A GPTQ-like recipe: model.L.weight on its INT4 grid; a float layer gets the float weight back, and
    a rounded recipe without its float weights is refused before any work."""
    model, recipe, tensors, weights, _ = case
    rounded = dict(tensors)
    for n in recipe.layers:
        rounded[f"model.{n}.weight"] = fake_quant_weight(weights[n], tensors[f"quant.{n}.weight_scale"], None, 4)
    gptq = dataclasses.replace(recipe, weight_rounding="gptq")
    new, new_tensors, _ = choose_float_layers(model, gptq, rounded, weights, dataclasses.replace(PROBE, max_float_layers=1))
    (name,) = new.float_layers
    assert not torch.equal(rounded[f"model.{name}.weight"], weights[name])
    check_float_layers(gptq, rounded, new, new_tensors, weights)
    kept = next(n for n in new.layers)
    assert new_tensors[f"model.{kept}.weight"] is rounded[f"model.{kept}.weight"]
    with pytest.raises(ConfigError, match="float weight of"):
        choose_float_layers(model, gptq, rounded, {}, dataclasses.replace(PROBE, max_float_layers=1))


def test_settings_are_checked_before_any_work(case):
    model, recipe, tensors, weights, _ = case
    with pytest.raises(ConfigError, match="needs a budget"):
        choose_float_layers(model, recipe, tensors, weights, PROBE)
    with pytest.raises(ConfigError, match="does not quantize"):
        choose_float_layers(model, recipe, tensors, {"x_embedder.proj": torch.zeros(1)}, dataclasses.replace(PROBE, max_float_layers=1))
    for bad in ({"min_psnr": 0}, {"max_float_layers": -1}, {"probe_samples": 0}, {"probe_steps": "nope"}, {"sensitivity": "both"}):
        with pytest.raises(ConfigError):
            FallbackSettings(**bad)


class Curve:
    """A constructed measure: k float layers give one-step error 10^(-k/10) (1 dB of SQNR per layer) and
    probe PSNR ``psnr[k]``; it counts the probes run."""

    full_error = 1.0

    def __init__(self, psnr):
        self.curve, self.probed = psnr, []

    def one_step(self, floats) -> float:
        return 10 ** (-len(floats) / 10)

    def psnr(self, floats) -> float:
        self.probed.append(len(floats))
        return self.curve[len(floats)]


def test_the_search_skips_probes_far_from_the_budget_and_backfills_them():
    """0.3 dB of probe per dB of one-step SQNR, then a jump to 40 dB at 5 layers: with a 39 dB budget the
    first steps are too far short to probe; the first probe that meets comes later, and the skipped steps
    before it are probed top down, so the answer is still the first prefix that meets."""
    psnr = [30 + 0.3 * k for k in range(5)] + [40.0] * 7
    curve = Curve(psnr)
    candidates = [{"layer": f"l{k}"} for k in range(11)]
    chosen, steps, met, reached = _budget(curve, candidates, psnr[0], FallbackSettings(min_psnr=39.0), False)
    assert met and chosen == ["l0", "l1", "l2", "l3", "l4"] and reached == 40.0
    assert MAX_SKIPS == 3 and curve.probed == [4, 8, 7, 6, 5]  # the full recipe's probe is the caller's
    assert [s["probe_psnr_db"] is None for s in steps] == [False, True, True, True, False, False, False, False, False]
    # a probe that misses stops the back-fill: the answer is the smallest prefix of the run that meets
    curve = Curve(psnr[:6] + [38.0] + psnr[7:])
    chosen, _, met, _ = _budget(curve, candidates, psnr[0], FallbackSettings(min_psnr=39.0), False)
    assert met and len(chosen) == 7 and curve.probed == [4, 8, 7, 6]
