import math

import pytest
import torch

from ditrt.calibrate.balance import (
    BalanceReport,
    activation_salience,
    csb_factors,
    degenerate_channels,
    fold_into_adaln,
    fold_into_v,
    smoothquant_factors,
    spearman,
    ssc_salience,
    weight_salience,
)
from ditrt.calibrate.scale_search import activation_scale, weight_scale
from ditrt.contracts.errors import ConfigError, InputError
from ditrt.contracts.model_config import CONFIGS
from ditrt.contracts.quantizers import fake_quant, fake_quant_weight
from tests.conftest import TINY, random_dit

scipy_stats = pytest.importorskip("scipy.stats")


def _outlier_problem(seed=0, n=256, c=64, out=48, outliers=(3, 17, 40), factor=50.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g)
    x[:, list(outliers)] *= factor
    w = torch.randn(out, c, generator=g) * 0.1
    return x, w


def test_salience_vectors():
    x = torch.tensor([[[1.0, -5.0], [-2.0, 0.5]]])  # (N, T, C)
    assert activation_salience(x).tolist() == [2.0, 5.0]
    w = torch.tensor([[1.0, -3.0, 0.0], [-2.0, 1.0, 0.5]])
    assert weight_salience(w).tolist() == [2.0, 3.0, 0.5]


def test_csb_balances_both_saliences_and_keeps_the_product():
    x, w = _outlier_problem()
    sx, sw = activation_salience(x), weight_salience(w)
    d = csb_factors(sx, sw)
    xb, wb = x / d, w * d
    balanced = (sx * sw).sqrt()
    assert torch.allclose(activation_salience(xb), balanced, rtol=1e-5)
    assert torch.allclose(weight_salience(wb), balanced, rtol=1e-5)
    assert torch.allclose(xb @ wb.T, x @ w.T, rtol=1e-4, atol=1e-4)


def test_smoothquant_half_equals_csb_and_alpha_limits():
    x, w = _outlier_problem(seed=1)
    sx, sw = activation_salience(x), weight_salience(w)
    assert torch.allclose(smoothquant_factors(sx, sw, alpha=0.5), csb_factors(sx, sw), rtol=1e-6)
    assert torch.allclose(smoothquant_factors(sx, sw, alpha=1.0), sx)  # all salience moved to the weight
    assert torch.allclose(smoothquant_factors(sx, sw, alpha=0.0), 1 / sw)
    with pytest.raises(ConfigError):
        smoothquant_factors(sx, sw, alpha=1.5)


def test_degenerate_channels_keep_factor_one():
    sx = torch.tensor([4.0, 0.0, 1.0, float("inf"), 9.0, 2.0])
    sw = torch.tensor([1.0, 1.0, 0.0, 1.0, float("nan"), 1e-12])
    d = csb_factors(sx, sw)
    assert d.tolist() == [2.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert torch.equal(smoothquant_factors(sx, sw, alpha=0.3)[1:], torch.ones(5))
    report = BalanceReport.of("blocks.0.attn.qkv", d, sx, sw)
    assert (report.channels, report.skipped, report.d_min, report.d_max) == (6, 5, 1.0, 2.0)
    assert degenerate_channels(sx, sw).tolist() == [False, True, True, True, True, True]
    with pytest.raises(InputError):
        csb_factors(sx, sw[:3])


@pytest.mark.parametrize("seed", range(4))
def test_spearman_matches_scipy_with_ties(seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 8, (60,), generator=g).float()  # many ties
    b = a + torch.randint(-4, 5, (60,), generator=g).float()
    expected = scipy_stats.spearmanr(a.numpy(), b.numpy()).statistic
    assert spearman(a, b) == pytest.approx(float(expected), abs=1e-12)
    c = torch.randn(60, generator=g)
    assert spearman(a, c) == pytest.approx(float(scipy_stats.spearmanr(a.numpy(), c.numpy()).statistic), abs=1e-12)


def test_spearman_edge_cases():
    x = torch.arange(10.0)
    assert spearman(x, x.exp()) == pytest.approx(1.0)  # monotone, not linear
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert spearman(x, torch.ones(10)) == 0.0  # constant: no ranking
    with pytest.raises(InputError):
        spearman(x, x[:5])


def test_ssc_weights_timesteps_by_softmax_of_minus_rho():
    sw = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    act = torch.tensor(
        [
            [10.0, 20.0, 30.0, 40.0, 50.0],  # same ranking as s(W): rho = 1
            [5.0, 4.0, 3.0, 2.0, 1.0],  # reversed: rho = -1
            [0.1, 0.3, 0.5, 0.2, 0.4],  # ranks (1, 3, 5, 2, 4): rho = 1 - 6 * 10 / 120 = 0.5
        ]
    )
    s_rho, eta, rho = ssc_salience(act, sw)
    assert rho.tolist() == pytest.approx([1.0, -1.0, 0.5], abs=1e-12)
    z = [math.exp(-1.0), math.exp(1.0), math.exp(-0.5)]
    expected = [v / sum(z) for v in z]
    assert eta.tolist() == pytest.approx(expected, abs=1e-12)
    assert float(eta.sum()) == pytest.approx(1.0)
    assert torch.allclose(s_rho, sum(e * a for e, a in zip(expected, act)), rtol=1e-6)
    with pytest.raises(InputError):
        ssc_salience(act, sw[:4])


def _inputs(config, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, config.input_size, config.input_size, generator=g)
    t = torch.tensor([10.0, 700.0, 300.0, 999.0][:batch])
    y = torch.randint(0, config.num_classes, (batch,), generator=g)
    return x, t, y


def _random_factors(c, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.exp(torch.empty(c).uniform_(math.log(0.1), math.log(10.0), generator=g))


# DiT-S/2 at full size: 12 blocks, hidden 384, 6 heads, 256 tokens
@pytest.mark.parametrize("config", [TINY, CONFIGS["DiT-S/2"]], ids=["tiny", "DiT-S/2"])
def test_folds_preserve_the_model_output(config):
    torch.manual_seed(0)
    model = random_dit(config, std=0.02)
    x, t, y = _inputs(config, batch=2)
    with torch.no_grad():
        ref = model(x, t, y)
        qkv_before = model.blocks[0].attn.qkv.weight.clone()
        c = config.hidden_size
        for i, block in enumerate(model.blocks):
            fold_into_adaln(block, "msa", _random_factors(c, 3 * i))
            fold_into_adaln(block, "mlp", _random_factors(c, 3 * i + 1))
            fold_into_v(block, _random_factors(c, 3 * i + 2))
        out = model(x, t, y)
    assert not torch.equal(model.blocks[0].attn.qkv.weight, qkv_before)
    assert float((out - ref).abs().max()) <= 1e-4
    assert float(ref.abs().max()) > 1e-2  # the comparison is not between two near-zero tensors


def test_fold_into_adaln_divides_the_consumer_input():
    model = random_dit(TINY)
    block = model.blocks[0]
    seen = {}
    block.attn.qkv.register_forward_pre_hook(lambda m, a: seen.__setitem__("qkv", a[0].clone()))
    block.mlp.fc1.register_forward_pre_hook(lambda m, a: seen.__setitem__("fc1", a[0].clone()))
    x, t, y = _inputs(TINY, batch=2)
    with torch.no_grad():
        model(x, t, y)
        before = dict(seen)
        d_msa, d_mlp = _random_factors(64, 0), _random_factors(64, 1)
        fold_into_adaln(block, "msa", d_msa)
        fold_into_adaln(block, "mlp", d_mlp)
        model(x, t, y)
    assert torch.allclose(seen["qkv"], before["qkv"] / d_msa, rtol=1e-4, atol=1e-5)
    assert torch.allclose(seen["fc1"], before["fc1"] / d_mlp, rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError):
        fold_into_adaln(block, "ffn", d_msa)
    with pytest.raises(InputError):
        fold_into_v(block, -d_msa)


def _w8a8_error(x, w):
    """Relative error of per-tensor int8 activations times per-channel int8 weights."""
    s_x, _ = activation_scale(x, 8)
    s_w, _ = weight_scale(w, 8)
    yq = fake_quant(x, s_x, None, 8) @ fake_quant_weight(w, s_w, None, 8).T
    y = x @ w.T
    return float((yq - y).norm() / y.norm())


@pytest.mark.parametrize("seed", range(3))
def test_balancing_beats_naive_on_injected_outlier_channels(seed):
    x, w = _outlier_problem(seed=seed)
    naive = _w8a8_error(x, w)
    d = csb_factors(activation_salience(x), weight_salience(w))
    balanced = _w8a8_error(x / d, w * d)
    sq = smoothquant_factors(activation_salience(x), weight_salience(w), alpha=0.8)
    assert balanced < 0.5 * naive
    assert _w8a8_error(x / sq, w * sq) < naive
