import json

import pytest
import torch
from click.testing import CliRunner

from ditrt.calibrate.observe import observe_linear_inputs
from ditrt.calibrate.ptq import CalibrateConfig, calibrate, quantized_layers
from ditrt.cli import main
from ditrt.contracts.errors import ArtifactError, ConfigError
from ditrt.contracts.files import state_dict_hash
from ditrt.contracts.model_config import CONFIGS
from ditrt.contracts.recipe import load_recipe, save_recipe
from ditrt.models.checkpoints import save_ditrt_checkpoint
from ditrt.models.quantized import QuantLinear, load_quantized
from tests.calibrate.conftest import SETTINGS
from tests.conftest import random_dit


def _inputs(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.tensor([10.0, 250.0, 600.0, 999.0])[:n], torch.tensor([0, 3, 9, 10])[:n]


def test_calibration_records_the_cfg_batch_at_uniform_steps(batches):
    assert len(batches) == 5
    x, t, y = batches[0]
    assert x.shape == (8, 1, 8, 8) and (y[4:] == 10).all() and (y[:4] < 10).all()
    assert [float(b[1][0]) for b in batches] == sorted((float(b[1][0]) for b in batches), reverse=True)
    assert float(batches[0][1][0]) == 999.0 and float(batches[-1][1][0]) == 0.0


def test_observed_stats_are_per_step_channel_maxima(model, batches):
    stats = observe_linear_inputs(model, ["blocks.0.attn.qkv", "blocks.1.mlp.fc2"], batches, samples_per_batch=100)
    s = stats["blocks.0.attn.qkv"]
    assert s.channel_max_by_step().shape == (5, 192) and s.sample_values().numel() == 500
    assert s.absmax == pytest.approx(float(s.channel_max_by_step().max()))
    assert stats["blocks.1.mlp.fc2"].channel_max_by_step().shape == (5, 768)


@pytest.mark.parametrize("method", ["smoothquant", "ptq4dit"])
def test_folded_float_model_equals_the_original(model, batches, method):
    recipe, tensors = calibrate(model, CalibrateConfig(method=method, precision="w8a8", calibration=SETTINGS), batches)
    assert len(recipe.balanced_layers) == 3 * 6
    folded = random_dit(CONFIGS["ditrt-digits"], seed=1)
    folded.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    x, t, y = _inputs()
    with torch.no_grad():
        ref, out = model(x, t, y), folded(x, t, y)
    assert (out - ref).abs().max() <= 1e-4
    # and the weights really changed: balancing was folded in
    assert not torch.equal(folded.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)


def test_recipe_layers_scales_and_zero_points(model, batches):
    recipe, tensors = calibrate(model, CalibrateConfig(method="minmax", precision="w8a8", calibration=SETTINGS), batches)
    assert recipe.layers == tuple(quantized_layers(model)) and len(recipe.layers) == 24
    assert recipe.deployable and recipe.symmetric and not any("zero_point" in k for k in tensors)
    assert tensors["quant.blocks.0.attn.qkv.weight_scale"].shape == (576,)
    assert tensors["quant.blocks.0.attn.qkv.input_scale"].shape == ()
    r4, t4 = calibrate(model, CalibrateConfig(method="minmax", precision="w4a16", calibration=SETTINGS), batches)
    assert r4.block_size == 64 and t4["quant.blocks.0.mlp.fc2.weight_scale"].shape == (192, 768 // 64)
    assert not any(k.endswith("input_scale") for k in t4)
    ra, ta = calibrate(model, CalibrateConfig(method="minmax", precision="w4a8", symmetric=False, calibration=SETTINGS), batches)
    assert not ra.deployable and "quant.blocks.0.attn.qkv.weight_zero_point" in ta and ra.notes


def test_quantize_all_adds_embedders_adaln_and_final_layer(model):
    names = quantized_layers(model, quantize_all=True)
    assert "t_embedder.mlp.0" in names and "blocks.5.adaLN_modulation.1" in names and "final_layer.linear" in names


def test_recipe_round_trip_and_simulation(model, batches, tmp_path):
    recipe, tensors = calibrate(model, CalibrateConfig(method="ptq4dit", precision="w8a8", calibration=SETTINGS), batches)
    save_recipe(recipe, tensors, tmp_path / "r")
    r2, t2 = load_recipe(tmp_path / "r")
    assert r2 == recipe and json.loads((tmp_path / "r" / "recipe.json").read_text())["deployable"] is True
    q, _ = load_quantized(tmp_path / "r", model)
    assert isinstance(q.blocks[0].attn.qkv, QuantLinear) and not isinstance(model.blocks[0].attn.qkv, QuantLinear)
    x, t, y = _inputs()
    with torch.no_grad():
        ref, out = model(x, t, y), q(x, t, y)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.1  # quantization changes the output, a little


def test_recipe_for_another_model_is_refused(model, batches, tmp_path):
    recipe, tensors = calibrate(model, CalibrateConfig(method="minmax", calibration=SETTINGS), batches)
    save_recipe(recipe, tensors, tmp_path / "r")
    other = random_dit(CONFIGS["ditrt-digits"], seed=7)
    assert state_dict_hash(other) != recipe.model_hash
    with pytest.raises(ArtifactError, match="calibrated for model"):
        load_quantized(tmp_path / "r", other)


def test_bad_configs_are_user_errors():
    with pytest.raises(ConfigError):
        CalibrateConfig(method="gptq")
    with pytest.raises(ConfigError):
        CalibrateConfig(precision="w2a2")
    with pytest.raises(ConfigError):
        CalibrateConfig(block_size=32)


def test_cli_calibrate_then_sample_with_recipe(model, tmp_path):
    ckpt = tmp_path / "m.safetensors"
    save_ditrt_checkpoint(model, ckpt)
    r = CliRunner().invoke(main, ["calibrate", "--model", str(ckpt), "--method", "ptq4dit", "--precision", "w8a8", "--calib-steps", "10",
                                  "--calib-timesteps", "3", "--calib-samples", "2", "--out", str(tmp_path / "r")])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "24 layers quantized, 18 balanced" in r.output
    r = CliRunner().invoke(main, ["sample", "--model", str(ckpt), "--recipe", str(tmp_path / "r"), "--steps", "5", "--num", "2",
                                  "--out", str(tmp_path / "s")])  # fmt: skip
    assert r.exit_code == 0, r.output
    other = tmp_path / "other.safetensors"
    save_ditrt_checkpoint(random_dit(CONFIGS["ditrt-digits"], seed=3), other)
    r = CliRunner().invoke(
        main, ["sample", "--model", str(other), "--recipe", str(tmp_path / "r"), "--out", str(tmp_path / "s2")]
    )
    assert r.exit_code == 2 and "calibrated for model" in r.output and not (tmp_path / "s2").exists()
