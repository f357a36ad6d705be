from __future__ import annotations

import pytest
import torch

from ditrt.calibrate.ptq import CalibrateConfig, calibrate
from ditrt.calibrate.reconstruct import AdaRoundLinear, ReconstructSettings, lsq_fake_quant, reconstruct
from ditrt.contracts.errors import ConfigError
from ditrt.contracts.quantizers import expand_weight_scale, fake_quant_weight
from ditrt.contracts.recipe import CalibrationSettings
from ditrt.diffusion.recording import record_calibration_inputs
from ditrt.models.quantized import QuantLinear, quantized_model
from tests.calibrate.conftest import SETTINGS
from tests.conftest import TINY, random_dit

#: Few iterations on few rows keep the tests fast; a 10x learning rate lets V move far enough in them.
FAST = ReconstructSettings(iters=50, batch_size=4, lr_weight=1e-2)


@pytest.fixture(scope="module")
def w4a8(model, batches):
    """A minmax W4A8 recipe, and what reconstruction makes of it."""
    recipe, tensors = calibrate(model, CalibrateConfig(method="minmax", precision="w4a8", calibration=SETTINGS, weights="rtn"), batches)
    new, report = reconstruct(model, recipe, tensors, batches, FAST)
    return recipe, tensors, new, report


def _total(report, key):
    return sum(b[key] for b in report["blocks"])


def test_reconstruction_lowers_every_block_error(w4a8):
    _, _, _, report = w4a8
    assert [b["block"] for b in report["blocks"]] == list(range(6)) and report["seconds"] > 0
    for b in report["blocks"]:
        assert b["mse_after"] < b["mse_before"], b
    assert _total(report, "mse_after") < 0.9 * _total(report, "mse_before")


def test_reconstructed_weights_are_on_their_grid(w4a8):
    recipe, tensors, new, _ = w4a8
    flipped = 0
    for name in recipe.layers:
        w, s = new[f"model.{name}.weight"], new[f"quant.{name}.weight_scale"]
        assert s is tensors[f"quant.{name}.weight_scale"]  # scales untouched
        assert torch.equal(fake_quant_weight(w, s, None, 4), w)  # round-to-nearest reproduces the learned rounding
        k = w / expand_weight_scale(s, w.shape)
        assert torch.allclose(k, k.round(), atol=1e-4) and k.round().min() >= -8 and k.round().max() <= 7
        flipped += int((w != fake_quant_weight(tensors[f"model.{name}.weight"], s, None, 4)).sum())
        a = new[f"quant.{name}.input_scale"]
        assert a.shape == () and a.dtype == torch.float32 and a > 0
    assert flipped > 0  # the rounding really differs from round-to-nearest somewhere
    # the input dict is left alone, and what is not reconstructed is passed through
    assert not torch.equal(tensors["model.blocks.0.mlp.fc1.weight"], new["model.blocks.0.mlp.fc1.weight"])
    assert new["model.blocks.0.adaLN_modulation.1.weight"] is tensors["model.blocks.0.adaLN_modulation.1.weight"]
    assert new.keys() == tensors.keys()


def test_reconstructed_recipe_lowers_the_model_output_error(model, batches, w4a8):
    recipe, tensors, new, _ = w4a8
    before, after = quantized_model(model, recipe, tensors), quantized_model(model, recipe, new)
    assert isinstance(after.blocks[3].mlp.fc2, QuantLinear)
    err_before = err_after = 0.0
    with torch.no_grad():
        for x, t, y in batches:
            ref = model(x, t, y)
            err_before += float((before(x, t, y) - ref).square().mean())
            err_after += float((after(x, t, y) - ref).square().mean())
    assert err_after < err_before


def test_weight_only_block_wise_recipe(model, batches):
    recipe, tensors = calibrate(model, CalibrateConfig(method="minmax", precision="w4a16", calibration=SETTINGS, weights="rtn"), batches)
    assert tensors["quant.blocks.0.mlp.fc2.weight_scale"].shape == (192, 768 // 64)
    few = [b for i, b in enumerate(batches) if i % 2 == 0]
    new, report = reconstruct(model, recipe, tensors, few, ReconstructSettings(iters=30, batch_size=4, lr_weight=1e-2))
    assert _total(report, "mse_after") < 0.9 * _total(report, "mse_before")
    w, s = new["model.blocks.2.mlp.fc2.weight"], new["quant.blocks.2.mlp.fc2.weight_scale"]
    assert torch.equal(fake_quant_weight(w, s, None, 4), w)
    assert not any(k.endswith("input_scale") for k in new)


def test_quantize_all_reconstructs_only_block_layers():
    tiny = random_dit(TINY)
    settings = CalibrationSettings(steps="10", timesteps=2, samples=2)
    batches = record_calibration_inputs(tiny, settings)
    recipe, tensors = calibrate(tiny, CalibrateConfig(method="minmax", quantize_all=True, calibration=settings), batches)
    new, report = reconstruct(tiny, recipe, tensors, batches, ReconstructSettings(iters=3, batch_size=2))
    assert len(report["blocks"]) == 2
    for name in ("t_embedder.mlp.0", "final_layer.linear"):
        assert new[f"model.{name}.weight"] is tensors[f"model.{name}.weight"]
        assert new[f"quant.{name}.input_scale"] is tensors[f"quant.{name}.input_scale"]
    w, s = new["model.blocks.1.adaLN_modulation.1.weight"], tensors["quant.blocks.1.adaLN_modulation.1.weight_scale"]
    assert not torch.equal(w, tensors["model.blocks.1.adaLN_modulation.1.weight"])
    assert torch.equal(fake_quant_weight(w, s, None, 8), w)


def test_adaround_starts_at_the_float_weight_and_rounds_to_nearest():
    lin = torch.nn.Linear(128, 16)
    w = lin.weight.detach()
    scale = w.abs().reshape(16, 2, 64).amax(-1) / 7  # block-wise (out, in // 64)
    q = QuantLinear(lin, weight_bits=4, act_bits=8).set_scales(scale, input_scale=torch.tensor(0.02))
    ada = AdaRoundLinear(q)
    assert torch.allclose(ada.soft_weight(), w, atol=1e-6)
    assert torch.equal(ada.hard_weight(), q.quantized_weight())
    assert float(ada.regulariser(2.0).detach()) > 0


def test_lsq_gradient_is_straight_through_inside_and_clipped_outside():
    x = torch.tensor([0.13, -0.26, 5.0, -5.0], requires_grad=True)
    s = torch.tensor(0.1, requires_grad=True)
    y = lsq_fake_quant(x, s, 4)
    assert torch.allclose(y, torch.tensor([0.1, -0.3, 0.7, -0.8]))
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([1.0, 1.0, 0.0, 0.0]))
    # d/ds: round(x/s) - x/s inside the range, the clip level outside
    assert float(s.grad) == pytest.approx((1 - 1.3) + (-3 + 2.6) + 7 - 8, abs=1e-5)


def test_asymmetric_recipes_and_bad_settings_are_refused(model, batches):
    recipe, tensors = calibrate(
        model, CalibrateConfig(method="minmax", precision="w4a8", symmetric=False, calibration=SETTINGS), batches
    )
    with pytest.raises(ConfigError, match="symmetric"):
        reconstruct(model, recipe, tensors, batches, FAST)
    with pytest.raises(ConfigError):
        ReconstructSettings(iters=0)
    with pytest.raises(ConfigError):
        ReconstructSettings(b_start=2.0, b_end=20.0)
