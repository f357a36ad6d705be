"""The calibration methods as registered strategies, each owning its settings; separate weight and
activation scale searches; the balancing's skipped channels in the recipe; the default recipes
unchanged by the redesign (tests/calibrate/data holds recipes made by the code before it)."""

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
import torch

from ditrt.calibrate.methods import QDIT_CHANNEL, REGISTRY, QDiTSettings, SmoothQuantSettings, get_method
from ditrt.calibrate.ptq import CalibrateConfig, calibrate
from ditrt.contracts.errors import ConfigError
from ditrt.contracts.recipe import METHODS, CalibrationSettings, save_recipe
from ditrt.diffusion.recording import record_calibration_inputs
from tests.conftest import TINY, random_dit

DATA = Path(__file__).parent / "data"
TINY_SETTINGS = CalibrationSettings(steps="5", timesteps=2, samples=2)  # as the recipes in DATA were made


@pytest.fixture(scope="module")
def tiny():
    return random_dit(TINY)


@pytest.fixture(scope="module")
def tiny_batches(tiny):
    return record_calibration_inputs(tiny, TINY_SETTINGS)


def _run(model, batches, **kw):
    return calibrate(model, CalibrateConfig(calibration=TINY_SETTINGS, **kw), batches)


def test_the_registry_holds_exactly_the_recipe_methods_each_with_frozen_settings():
    assert tuple(REGISTRY) == METHODS
    for name, method in REGISTRY.items():
        assert method.name == name and method.summary
        settings = method.settings()
        assert dataclasses.is_dataclass(settings) and settings.__dataclass_params__.frozen
    with pytest.raises(ConfigError, match="unknown method 'gptq'"):
        get_method("gptq")


def test_settings_of_another_method_are_refused():
    with pytest.raises(ConfigError, match="ptq4dit takes PTQ4DiTSettings, got SmoothQuantSettings"):
        CalibrateConfig(method="ptq4dit", method_settings=SmoothQuantSettings(alpha=0.3))
    with pytest.raises(ConfigError, match="alpha must lie in"):
        SmoothQuantSettings(alpha=1.5)
    with pytest.raises(ConfigError, match="qdit candidates"):
        QDiTSettings(candidates=(32,))


def test_smoothquant_alpha_reaches_the_method(tiny, tiny_batches):
    r5, t5 = _run(tiny, tiny_batches, method="smoothquant")
    r3, t3 = _run(tiny, tiny_batches, method="smoothquant", method_settings=SmoothQuantSettings(alpha=0.3))
    assert (r5.alpha, r3.alpha) == (0.5, 0.3)
    key = "model.blocks.0.attn.qkv.weight"
    assert not torch.equal(t5[key], t3[key])  # another migration strength folds other factors


def test_qdit_settings_reach_the_search(tiny, tiny_batches):
    settings = QDiTSettings(budget=1.0, fitness="proxy", candidates=(QDIT_CHANNEL,))
    recipe, tensors = _run(tiny, tiny_batches, method="qdit", precision="w4a16", method_settings=settings)
    report = recipe.details["granularity_search"]
    assert report["fitness"] == "proxy" and report["budget"] == 1.0
    assert set(recipe.layer_block_sizes.values()) == {QDIT_CHANNEL} and not recipe.deployable  # per-channel INT4 only
    assert tensors["quant.blocks.0.mlp.fc2.weight_scale"].shape == (64,)
    default, _ = _run(tiny, tiny_batches, method="qdit", precision="w4a16", method_settings=QDiTSettings(fitness="proxy"))
    assert set(default.layer_block_sizes.values()) <= {64, 128} and default.details["granularity_search"]["budget"] is None


def test_weight_and_activation_searches_each_change_only_their_scales(tiny, tiny_batches):
    base, tb = _run(tiny, tiny_batches, method="minmax")
    wr, tw = _run(tiny, tiny_batches, method="minmax", weight_search="mse")
    ar, ta = _run(tiny, tiny_batches, method="minmax", act_search="mse")
    assert (base.scale_search, base.act_scale_search) == ("minmax", "minmax")
    assert (wr.scale_search, wr.act_scale_search) == ("mse", "minmax")
    assert (ar.scale_search, ar.act_scale_search) == ("minmax", "mse")
    weights = [k for k in tb if k.endswith("weight_scale")]
    inputs = [k for k in tb if k.endswith("input_scale")]
    assert weights and inputs
    assert any(not torch.equal(tb[k], tw[k]) for k in weights) and all(torch.equal(tb[k], tw[k]) for k in inputs)
    assert any(not torch.equal(tb[k], ta[k]) for k in inputs) and all(torch.equal(tb[k], ta[k]) for k in weights)
    assert all(torch.equal(tb[k], tw[k]) and torch.equal(tb[k], ta[k]) for k in tb if k.startswith("model."))


def test_ditas_honours_both_searches(tiny, tiny_batches):
    _, both = _run(tiny, tiny_batches, method="ditas", weight_search="minmax", act_search="minmax")
    _, acts = _run(tiny, tiny_batches, method="ditas", weight_search="minmax", act_search="mse")
    assert any(not torch.equal(both[k], acts[k]) for k in both if k.endswith("input_scale"))


@pytest.mark.parametrize("method", ["ptq4dit", "smoothquant", "ditas"])
def test_dead_channels_are_counted_as_skipped(tiny_batches, method):
    model = random_dit(TINY)
    with torch.no_grad():  # dead input channels: all-zero weight columns (the weight salience is 0)
        model.blocks[0].attn.qkv.weight[:, 5] = 0
        model.blocks[1].mlp.fc1.weight[:, [2, 9]] = 0
    recipe, _ = calibrate(model, CalibrateConfig(method=method, calibration=TINY_SETTINGS), tiny_batches)
    balance = recipe.details["balance"]
    assert balance == {"layers": 3 * TINY.depth, "channels": 3 * TINY.depth * TINY.hidden_size, "skipped_channels": 3,
                       "per_layer": {"blocks.0.attn.qkv": 1, "blocks.1.mlp.fc1": 2}}  # fmt: skip


def test_no_balance_record_where_nothing_was_balanced(tiny, tiny_batches):
    assert "balance" not in _run(tiny, tiny_batches, method="minmax")[0].details
    recipe, _ = _run(tiny, tiny_batches, method="ptq4dit", precision="w4a16")
    assert "balance" not in recipe.details and recipe.balanced_layers == () and "balancing skipped" in recipe.notes[0]


@pytest.mark.parametrize("name", sorted(p.stem for p in DATA.glob("tiny-*.json")))
def test_recipes_are_those_made_before_the_redesign(tiny, tiny_batches, name, tmp_path):
    before = json.loads((DATA / f"{name}.json").read_text())
    method, precision = name.split("-")[1:]
    recipe, tensors = _run(tiny, tiny_batches, method=method, precision=precision, weight_search="mse", act_search="mse", weights="rtn")  # defaults then
    save_recipe(recipe, tensors, tmp_path)
    after = json.loads((tmp_path / "recipe.json").read_text())
    assert after["details"].pop("balance")["skipped_channels"] == 0  # a field added later
    added = {"weight_rounding": "rtn", "float_layers": {}, "runtime_smoothed": []}  # issue 13's fields, at their defaults
    assert {k: after.pop(k) for k in added} == added
    assert after == before["recipe"]
    assert hashlib.sha256((tmp_path / "weights.safetensors").read_bytes()).hexdigest() == before["weights_sha256"]


def test_calibrate_takes_recorded_batches(tiny, tiny_batches):
    with pytest.raises(ConfigError, match="recorded calibration batches"):
        calibrate(tiny, CalibrateConfig(calibration=TINY_SETTINGS), lambda m: None)
    with pytest.raises(ConfigError, match="no calibration batches"):
        calibrate(tiny, CalibrateConfig(calibration=TINY_SETTINGS), [])


def test_ignored_settings_are_refused_by_the_config():
    with pytest.raises(ConfigError, match="does not quantize activations"):
        CalibrateConfig(precision="w4a16", timestep_groups=2)
    with pytest.raises(ConfigError, match="weight scale search"):
        CalibrateConfig(weight_search="max")
    with pytest.raises(ConfigError, match="reconstruct iterations"):
        CalibrateConfig(reconstruct_iters=5)
