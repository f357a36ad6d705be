"""GPTQ on fixed TensorRT grids: lower output error than round to nearest with the same scales, every
weight on its grid, and the Hessians of a model's Linear inputs observed in passes over the batches."""

import pytest
import torch

from ditrt.calibrate.gptq import gptq_round, gptq_weights, output_error
from ditrt.calibrate.observe import capture_layer_inputs, observe_input_grams
from ditrt.calibrate.ptq import quantized_layers
from ditrt.calibrate.scale_search import weight_scale
from ditrt.contracts.errors import InputError
from ditrt.contracts.quantizers import expand_weight_scale, fake_quant_weight, qrange
from ditrt.contracts.recipe import CalibrationSettings
from ditrt.diffusion.recording import record_calibration_inputs
from tests.conftest import TINY, random_dit

GRIDS = [(8, 0), (4, 64)]  # INT8 per output channel, INT4 blocks of 64 along the input dimension


def _layer(seed=0, n=2048, c=128, out=64):
    """Inputs with correlated channels and one outlier channel (x20), and a (64, 128) weight."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g) @ (torch.eye(c) + torch.randn(c, c, generator=g) / c**0.5)
    x[:, 5] *= 20
    return x, torch.randn(out, c, generator=g) * 0.05


def _scale(w, bits, block):
    return weight_scale(w, bits, granularity="block" if block else "channel", block_size=block or None)[0]


def _assert_on_grid(wq, scale, bits):
    s = expand_weight_scale(scale, wq.shape)
    q = (wq / s).round()
    lo, hi = qrange(bits)
    assert torch.equal(q * s, wq) and (wq / s - q).abs().max() < 1e-4 and q.min() >= lo and q.max() <= hi
    assert torch.equal(fake_quant_weight(wq, scale, None, bits), wq)


@pytest.mark.parametrize("bits,block", GRIDS)
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_lowers_the_output_error_of_round_to_nearest_on_the_same_grid(bits, block, act_order):
    x, w = _layer()
    scale = _scale(w, bits, block)
    h = x.double().T @ x.double()
    wq = gptq_round(w, h, scale, bits, act_order=act_order, columns=32)  # 4 lazy batches
    assert wq.dtype == torch.float32 and wq.shape == w.shape
    _assert_on_grid(wq, scale, bits)
    rtn = fake_quant_weight(w, scale, None, bits)

    def err(v):
        return float((x @ v.T - x @ w.T).square().sum())

    assert err(wq) < 0.5 * err(rtn)  # measured: about a third of round to nearest's error at both grids
    assert output_error(w, wq, h) == pytest.approx(err(wq) / float((x @ w.T).square().sum()), rel=1e-3)


def test_an_identity_hessian_is_round_to_nearest_and_dead_columns_stay_rounded():
    x, w = _layer(seed=1, n=512)
    scale = _scale(w, 8, 0)
    rtn = fake_quant_weight(w, scale, None, 8)
    assert torch.equal(gptq_round(w, torch.eye(128, dtype=torch.float64), scale, 8), rtn)  # nothing to compensate
    x[:, [3, 70]] = 0  # two input channels no token reaches: H_jj = 0
    wq = gptq_round(w, x.double().T @ x.double(), scale, 8)
    _assert_on_grid(wq, scale, 8)
    assert torch.equal(wq[:, [3, 70]], rtn[:, [3, 70]]) and not torch.equal(wq, rtn)


def test_bad_hessians_and_scales_are_refused_in_one_line():
    x, w = _layer(n=256)
    h, scale = x.double().T @ x.double(), _scale(w, 8, 0)
    nan = h.clone()
    nan[2, 2] = float("nan")
    cases = [
        ((w, h[:64, :64], scale, 8), {}, "Hessian must be"),
        ((w, nan, scale, 8), {}, "NaN"),
        ((w, h, scale[:10], 8), {}, "fits no grid"),
        ((w, h, _scale(w, 4, 64), 4), {"block_size": 32}, "fits no grid"),
        ((w, -h, scale, 8), {}, "not positive definite"),
    ]
    for args, kwargs, match in cases:
        with pytest.raises(InputError, match=match) as info:
            gptq_round(*args, **kwargs)
        assert "\n" not in str(info.value)


@pytest.fixture(scope="module")
def tiny():
    model = random_dit(TINY)
    return model, record_calibration_inputs(model, CalibrationSettings(steps="10", timesteps=2, samples=4))


def test_input_grams_are_every_token_rows_gram_matrix(tiny):
    model, batches = tiny
    layers = ["blocks.0.attn.qkv", "blocks.1.mlp.fc2"]
    grams = observe_input_grams(model, layers, batches, rows=3)  # slices of 3 of the 8 rows per batch
    rows = capture_layer_inputs(model, layers, batches, tokens_per_batch=8 * 16, rows=3)  # every token row (8 rows of 16 tokens)
    for name in layers:
        x = rows[name].rows.double()
        assert x.shape[0] == 2 * 8 * 16 and grams[name].dtype == torch.float64
        exact = x.T @ x
        torch.testing.assert_close(grams[name], exact, rtol=1e-5, atol=1e-6 * float(exact.abs().max()))  # float32 products


@pytest.mark.parametrize("bits,block", GRIDS)
def test_gptq_weights_of_a_tiny_dit_are_on_grid_and_beat_round_to_nearest(tiny, bits, block):
    model, batches = tiny
    layers = quantized_layers(model)
    scales = {n: _scale(model.get_submodule(n).weight.detach(), bits, block) for n in layers}
    blocks = dict.fromkeys(layers, block)
    weights, report = gptq_weights(model, layers, batches, scales, bits, blocks)
    assert set(weights) == set(layers) == set(report["per_layer"]) and report["passes"] == 1
    for name in layers:
        assert weights[name].shape == model.get_submodule(name).weight.shape
        _assert_on_grid(weights[name], scales[name], bits)
    assert report["gptq_mean"] < 0.8 * report["rtn_mean"]
    assert sum(r["gptq"] < r["rtn"] for r in report["per_layer"].values()) >= len(layers) - 1
    # observed three layers a pass: the same Hessians, so the same weights
    again, report3 = gptq_weights(model, layers, batches, scales, bits, blocks, layers_per_pass=3)
    assert report3["passes"] == 3 and all(torch.equal(again[n], weights[n]) for n in layers)
