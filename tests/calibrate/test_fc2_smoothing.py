"""fc2 smoothing (issue 13 item 6): a balancing method also smooths every block's fc2, whose input (the GELU
output) has no fold partner, by scaling fc2's weight columns by d and multiplying its input by 1/d at run
time. The float computation is unchanged, and every later pass over the working model sees x / d."""

import copy
import dataclasses

import pytest
import torch

from ditrt.calibrate.balance import BALANCED
from ditrt.calibrate.config import CalibrateConfig
from ditrt.calibrate.methods import SmoothQuantSettings, Step
from ditrt.calibrate.observe import observe_linear_inputs
from ditrt.calibrate.ptq import quantized_layers
from ditrt.contracts.errors import ArtifactError
from ditrt.contracts.precisions import get_precision
from ditrt.contracts.recipe import CalibrationSettings
from ditrt.diffusion.recording import record_calibration_inputs
from ditrt.models.quantized import folded_float_model, input_reciprocal, quantized_model
from tests.conftest import TINY, random_dit
from tests.export.recipes import absmax_recipe, rel_l2

SETTINGS = CalibrationSettings(steps="5", timesteps=2, samples=2)
FC2 = [f"blocks.{i}.mlp.fc2" for i in range(TINY.depth)]


@pytest.fixture(scope="module")
def tiny():
    return random_dit(TINY)


@pytest.fixture(scope="module")
def tiny_batches(tiny):
    return record_calibration_inputs(tiny, SETTINGS)


def _balance(model, batches, method: str, settings=None):
    """The method's balancing step on a working copy, as the procedure runs it: (working model, Balanced)."""
    work = copy.deepcopy(model)
    config = CalibrateConfig(method=method, method_settings=settings, smooth_fc2=True, calibration=SETTINGS)
    layers = quantized_layers(work)
    targets = [n for n in layers if n.split(".", 2)[-1] in BALANCED]
    return work, config.strategy.balance(Step(work, layers, targets, batches, get_precision(config.precision), config))


@pytest.mark.parametrize("method, settings", [("ptq4dit", None), ("smoothquant", SmoothQuantSettings(alpha=1.0))])
def test_smoothed_float_computation_is_the_original_model(tiny, tiny_batches, method, settings):
    work, balanced = _balance(tiny, tiny_batches, method, settings)
    assert sorted(balanced.runtime_divisors) == FC2 and not set(FC2) & set(balanced.layers)
    assert balanced.summary()["runtime_smoothed"] == len(FC2)
    for name, d in balanced.runtime_divisors.items():
        assert d.dtype == torch.float32 and d.device.type == "cpu" and float((d - 1).abs().max()) > 0.1, name
        original = tiny.get_submodule(name).weight
        torch.testing.assert_close(work.get_submodule(name).weight, original * d[None, :], rtol=1e-6, atol=0)

    # the recipe's float computation: its model.* weights plus the divisors, as quant.<layer>.input_divisor
    tensors = {f"model.{k}": v for k, v in work.state_dict().items()}
    assert not any("divisor" in k for k in tensors)  # the state dict keeps the checkpoint's keys
    divisors = {f"quant.{n}.input_divisor": d for n, d in balanced.runtime_divisors.items()}
    recipe_float = folded_float_model(tiny, {**tensors, **divisors})
    weights_alone = folded_float_model(tiny, tensors)
    x, t, y = tiny_batches[0]
    with torch.no_grad():
        ref = tiny(x, t, y)
        assert rel_l2(work(x, t, y), ref) <= 1e-5  # the working model (hooks) computes the original
        assert rel_l2(recipe_float(x, t, y), ref) <= 1e-5
        assert rel_l2(weights_alone(x, t, y), ref) > 1e-3  # without its divisors model.* is another model


def test_later_passes_see_the_smoothed_input(tiny, tiny_batches):
    work, balanced = _balance(tiny, tiny_batches, "smoothquant", SmoothQuantSettings(alpha=0.5))
    before = observe_linear_inputs(tiny, FC2, tiny_batches)
    after = observe_linear_inputs(work, FC2, tiny_batches)
    for name, d in balanced.runtime_divisors.items():
        expected = before[name].channel_max_by_step() * input_reciprocal(d)
        torch.testing.assert_close(after[name].channel_max_by_step(), expected, rtol=1e-5, atol=1e-7)
        # alpha 0.5 on the max over steps: every channel of x / d and of W * d peaks at sqrt(s_x s_w)
        s_x, s_w = before[name].channel_max_by_step().amax(0), tiny.get_submodule(name).weight.abs().amax(0)
        torch.testing.assert_close(after[name].channel_max_by_step().amax(0), (s_x * s_w).sqrt(), rtol=1e-5, atol=1e-7)


def test_without_the_option_nothing_is_smoothed_at_run_time(tiny, tiny_batches):
    work = copy.deepcopy(tiny)
    config = CalibrateConfig(method="ptq4dit", calibration=SETTINGS)
    layers = quantized_layers(work)
    targets = [n for n in layers if n.split(".", 2)[-1] in BALANCED]
    balanced = config.strategy.balance(Step(work, layers, targets, tiny_batches, get_precision("w8a8"), config))
    assert balanced.runtime_divisors == {} and "runtime_smoothed" not in balanced.summary()
    assert torch.equal(work.blocks[0].mlp.fc2.weight, tiny.blocks[0].mlp.fc2.weight)


def test_simulation_multiplies_by_the_reciprocal_before_quantizing(tiny):
    """QuantLinear with an input divisor: x * (1/d) in the input's dtype, then the quantizers (also weight-only)."""
    for precision in ("w8a8", "w4a16"):
        recipe, tensors = absmax_recipe(tiny, precision, quantize_all=False)
        d = torch.linspace(0.5, 4.0, TINY.hidden_size * 4)
        smoothed = {**tensors, "quant.blocks.1.mlp.fc2.input_divisor": d}
        with pytest.raises(ArtifactError, match="disagree on whether blocks.1.mlp.fc2"):
            quantized_model(tiny, recipe, smoothed)  # the recipe does not list it in runtime_smoothed
        q = quantized_model(tiny, dataclasses.replace(recipe, runtime_smoothed=("blocks.1.mlp.fc2",)), smoothed)
        plain = quantized_model(tiny, recipe, tensors).blocks[1].mlp.fc2
        x = torch.randn(3, 5, TINY.hidden_size * 4)
        with torch.no_grad():
            assert torch.equal(q.blocks[1].mlp.fc2(x), plain(x * (1.0 / d)))
            assert torch.equal(q.blocks[1].mlp.fc2(x.half()), plain(x.half() * (1.0 / d).half()))


def test_the_option_is_refused_where_the_method_computes_no_factors():
    from ditrt.contracts.errors import ConfigError

    for method in ("smoothquant", "ptq4dit"):  # they balance only where activations are quantized
        with pytest.raises(ConfigError, match=f"{method} does not compute at w4a16"):
            CalibrateConfig(method=method, precision="w4a16", smooth_fc2=True)
    with pytest.raises(ConfigError, match="does not balance"):
        CalibrateConfig(method="minmax", smooth_fc2=True)
    assert CalibrateConfig(method="ditas", precision="w4a16", smooth_fc2=True).smooth_fc2  # DiTAS smooths at every precision
    assert CalibrateConfig(method="ptq4dit", precision="fp8", smooth_fc2=True).smooth_fc2
