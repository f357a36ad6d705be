from __future__ import annotations

import copy

import pytest
import torch

from ditrt.calibrate.balance import weight_salience
from ditrt.calibrate.ditas import (
    ALPHA_GRID,
    LayerQuant,
    ditas_factor,
    ditas_factors,
    layer_output_error,
    search_alpha,
)
from ditrt.calibrate.observe import capture_layer_inputs, observe_linear_inputs
from ditrt.calibrate.ptq import apply_balance
from ditrt.contracts.quantizers import fake_quant, fake_quant_weight

TARGETS = [f"blocks.{i}.{n}" for i in range(6) for n in ("attn.qkv", "mlp.fc1", "attn.proj")]


def _salient_layer(seed=0, n=256, c=64, out=48, salient=(3, 17, 40), factor=50.0):
    """Token rows with a few channels ``factor`` times larger than the rest, and a random Linear."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g)
    x[:, list(salient)] *= factor
    return x, torch.randn(out, c, generator=g) * 0.1, torch.randn(out, generator=g) * 0.1


def test_ditas_factor_by_hand():
    act, w = torch.tensor([4.0, 9.0, 0.0, 1.0]), torch.tensor([1.0, 4.0, 2.0, 0.0])
    # alpha 0.5: sqrt(4)/sqrt(1) = 2, sqrt(9)/sqrt(4) = 1.5; a zero max on either side keeps 1
    assert ditas_factor(act, w, 0.5).tolist() == [2.0, 1.5, 1.0, 1.0]
    assert ditas_factor(act, w, 1.0).tolist() == [4.0, 9.0, 1.0, 1.0]  # all range moved into the weight
    assert ditas_factor(act, w, 0.0).tolist() == [1.0, 0.25, 1.0, 1.0]  # 1 / w_col_max
    assert torch.allclose(ditas_factor(act, w, 0.25)[:2], torch.tensor([4.0**0.25, 9.0**0.25 / 4.0**0.75]))


def test_layer_output_error_by_hand():
    x, w, b = _salient_layer(n=32, c=8, out=4, salient=(2,))
    d = torch.rand(8, generator=torch.Generator().manual_seed(1)) + 0.5
    xs, ws = x / d, w * d
    wq = fake_quant_weight(ws, ws.abs().amax(dim=1) / 127, None, 8)
    xq = fake_quant(xs, xs.abs().max() / 127, None, 8)
    expected = ((xq @ wq.T + b) - (x @ w.T + b)).square().mean()
    assert layer_output_error(x, w, b, d, LayerQuant(8, 8)) == pytest.approx(float(expected), rel=1e-5)
    w_only = ((xs @ wq.T) - (x @ w.T)).square().mean()  # a_bits None: activations stay float
    assert layer_output_error(x, w, None, d, LayerQuant(8, None)) == pytest.approx(float(w_only), rel=1e-5)


def test_search_returns_the_argmin_and_smoothing_helps_salient_channels():
    x, w, b = _salient_layer()
    cmax = x.abs().amax(dim=0)
    w_col_max = weight_salience(w)
    d, alpha, errors = search_alpha(x, cmax, w, b, LayerQuant(8, 8))
    identity = layer_output_error(x, w, b, torch.ones(64), LayerQuant(8, 8))
    by_hand = [layer_output_error(x, w, b, ditas_factor(cmax, w_col_max, a), LayerQuant(8, 8)) for a in ALPHA_GRID]
    assert errors == [identity] + by_hand
    best = min(range(len(by_hand)), key=by_hand.__getitem__)
    assert alpha == ALPHA_GRID[best] and torch.equal(d, ditas_factor(cmax, w_col_max, alpha))
    assert by_hand[best] < identity  # smoothing the 50x channels must beat no smoothing at w8a8
    assert 0.0 < alpha < 1.0  # neither extreme: the search balances the two quantizers


def test_search_without_activation_quantization_never_loses_to_identity():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(256, 64, generator=g) * 2 - 1  # uniform activations, kept in float (a_bits None)
    w = torch.randn(48, 64, generator=g) * 0.1
    d, alpha, errors = search_alpha(x, x.abs().amax(dim=0), w, None, LayerQuant(8, None))
    identity = layer_output_error(x, w, None, torch.ones(64), LayerQuant(8, None))
    assert len(errors) == 1 + len(ALPHA_GRID) and errors[0] == identity
    assert min(errors) <= identity and layer_output_error(x, w, None, d, LayerQuant(8, None)) == min(errors)
    assert alpha is not None or torch.equal(d, torch.ones(64))
    _, _, grid_only = search_alpha(x, x.abs().amax(dim=0), w, None, LayerQuant(8, None), include_identity=False)
    assert grid_only == errors[1:]


def test_the_output_aware_searches_score_their_clips_on_the_rows_the_alpha_search_judges():
    # the weight clip is scored by dW H dW^T with H the Gram matrix of the smoothed rows themselves, so
    # at weight-only precision it is the argmin of the very output error the alpha search reports:
    # never above min-max's (clip ratio 1.0 is a candidate), for every divisor
    x, w, b = _salient_layer(seed=3)
    cmax = x.abs().amax(dim=0)
    for d in (torch.ones(64), ditas_factor(cmax, weight_salience(w), 0.5)):
        out = layer_output_error(x, w, b, d, LayerQuant(8, None, search="output"))
        assert out <= layer_output_error(x, w, b, d, LayerQuant(8, None, search="minmax")) * (1 + 1e-5)
    # at w8a8 the activation clip is scored on the same rows; the search returns a candidate's divisor
    _, alpha, errors = search_alpha(x, cmax, w, b, LayerQuant(8, 8, search="output"))
    assert len(errors) == 1 + len(ALPHA_GRID) and all(e == e and e >= 0 for e in errors)
    assert min(errors) < errors[0]  # smoothing the 50x channels still beats no smoothing


def test_capture_keeps_sampled_rows_and_the_max_over_all_tokens(model, batches):
    captured = capture_layer_inputs(model, ["blocks.0.attn.qkv", "blocks.2.attn.proj"], batches, tokens_per_batch=16)
    stats = observe_linear_inputs(model, ["blocks.0.attn.qkv"], batches)
    qkv = captured["blocks.0.attn.qkv"]
    assert qkv.rows.shape == (5 * 16, 192) and qkv.channel_max.shape == (192,)
    assert torch.equal(qkv.channel_max, stats["blocks.0.attn.qkv"].channel_max_by_step().amax(dim=0))
    assert (qkv.rows.abs() <= qkv.channel_max).all() and qkv.rows.abs().amax(dim=0).lt(qkv.channel_max).any()


def test_ditas_factors_fold_into_the_float_model_exactly(model, batches):
    factors, alphas = ditas_factors(model, TARGETS, batches, LayerQuant(8, 8), tokens_per_batch=32)
    assert set(factors) == set(alphas) == set(TARGETS)
    for d in factors.values():
        assert d.shape == (192,) and torch.isfinite(d).all() and (d > 0).all()
    assert any(a is not None for a in alphas.values())  # smoothing is chosen somewhere, so the fold is exercised
    captured = capture_layer_inputs(model, ["blocks.0.mlp.fc1"], batches, tokens_per_batch=32)["blocks.0.mlp.fc1"]
    a = alphas["blocks.0.mlp.fc1"]
    expected = (
        torch.ones(192) if a is None else ditas_factor(captured.channel_max, weight_salience(model.blocks[0].mlp.fc1.weight), a)
    )
    assert torch.equal(factors["blocks.0.mlp.fc1"], expected)
    folded = copy.deepcopy(model)
    apply_balance(folded, factors)
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(4, 1, 8, 8, generator=g), torch.tensor([10.0, 250.0, 600.0, 999.0]), torch.tensor([0, 3, 9, 10])
    with torch.no_grad():
        assert (folded(x, t, y) - model(x, t, y)).abs().max() <= 1e-4
    changed = [n for n, a in alphas.items() if a is not None]
    assert not torch.equal(folded.get_submodule(changed[0]).weight, model.get_submodule(changed[0]).weight)
