import pytest
import torch

from ditrt.calibrate.scale_search import MSE_RATIOS, PERCENTILES, activation_scale, weight_scale
from ditrt.contracts.errors import ConfigError, InputError
from ditrt.contracts.quantizers import fake_quant, fake_quant_weight, qrange, quantize


def _heavy_tailed(shape, seed=0):
    """Student-t with 2 degrees of freedom: a few huge values, most near 0."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=g)
    chi2 = torch.randn((2, *shape), generator=g).square().sum(0)
    return z / (chi2 / 2).sqrt()


def _weight_err(w, scale, zp, bits, symmetric=True):
    return (fake_quant_weight(w, scale, zp, bits, symmetric) - w).square().sum(dim=1)


def test_integer_ranges_clamp():
    assert qrange(8) == (-128, 127) and qrange(4) == (-8, 7)
    assert qrange(8, False) == (0, 255) and qrange(4, False) == (0, 15)
    x = torch.tensor([-1000.0, -128.4, -3.6, 0.0, 2.5, 126.6, 1000.0])
    assert quantize(x, torch.tensor(1.0), None, 8).tolist() == [-128, -128, -4, 0, 2, 127, 127]  # 2.5 -> 2: half to even
    assert quantize(x, torch.tensor(1.0), None, 4).tolist() == [-8, -8, -4, 0, 2, 7, 7]


@pytest.mark.parametrize("bits", [8, 4])
def test_grid_values_round_trip_exactly(bits):
    qmin, qmax = qrange(bits)
    scale = torch.tensor(0.03125)  # a power of two: integers * scale are exact floats
    ints = torch.arange(qmin, qmax + 1, dtype=torch.float32)
    x = ints * scale
    assert torch.equal(fake_quant(x, scale, None, bits), x)


def test_weight_grid_round_trip_and_symmetric_zero_point():
    g = torch.Generator().manual_seed(0)
    ints = torch.randint(-127, 128, (16, 32), generator=g).float()
    ints[:, 0] = 127  # every row reaches the clip, so minmax recovers scale exactly
    row_scale = 2.0 ** -torch.randint(2, 8, (16,), generator=g).float()
    w = ints * row_scale[:, None]
    scale, zp = weight_scale(w, 8)
    assert zp is None
    assert torch.equal(scale, row_scale)
    assert torch.equal(fake_quant_weight(w, scale, None, 8), w)


def test_asymmetric_round_trip_on_grid():
    qmin, qmax = qrange(8, False)
    scale, zp = torch.tensor(0.0625), torch.tensor(37.0)
    x = (torch.arange(qmin, qmax + 1, dtype=torch.float32) - zp) * scale
    assert torch.equal(fake_quant(x, scale, zp, 8, symmetric=False), x)
    s, z = activation_scale(x, 8, symmetric=False)
    assert s.shape == () and z.shape == () and float(z) == 37.0
    assert torch.allclose(s, scale) and torch.allclose(fake_quant(x, s, z, 8, False), x, atol=1e-6)


def test_asymmetric_weight_zero_point_shape_and_range():
    w = torch.rand(8, 64) * 3 - 0.5  # mostly positive: zero point well above qmin
    scale, zp = weight_scale(w, 4, symmetric=False)
    assert scale.shape == zp.shape == (8,)
    assert zp.dtype == torch.float32 and torch.equal(zp, zp.round())
    assert bool(((zp >= 0) & (zp <= 15)).all())
    err = (fake_quant_weight(w, scale, zp, 4, symmetric=False) - w).abs().max(dim=1).values
    assert bool((err <= scale / 2 + 1e-6).all())  # no clipping with the min/max range


def test_block_scales_shape_and_error():
    w = torch.randn(6, 256)
    scale, zp = weight_scale(w, 4, granularity="block", block_size=64)
    assert scale.shape == (6, 4) and zp is None
    blocks = w.reshape(6, 4, 64).abs().amax(-1)
    assert torch.allclose(scale, blocks / 7)
    assert weight_scale(w, 4, granularity="block", block_size=64, symmetric=False)[1].shape == (6, 4)
    with pytest.raises(ConfigError, match="divisor"):
        weight_scale(w, 4, granularity="block", block_size=100)
    with pytest.raises(ConfigError, match="search"):
        weight_scale(w, 4, search="kl")


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
def test_mse_search_beats_minmax_on_heavy_tails(bits, symmetric):
    w = _heavy_tailed((32, 512))
    s0, z0 = weight_scale(w, bits, symmetric=symmetric, search="minmax")
    s1, z1 = weight_scale(w, bits, symmetric=symmetric, search="mse")
    e0, e1 = _weight_err(w, s0, z0, bits, symmetric), _weight_err(w, s1, z1, bits, symmetric)
    assert bool((e1 <= e0 + 1e-6).all())  # per row, never worse (the full range is a candidate)
    if bits == 4:  # 15 or 16 levels: clipping the tails pays off (at 8 bits it rarely does)
        assert float(e1.sum()) < 0.95 * float(e0.sum())


def test_percentile_keeps_lowest_error_candidate():
    bits = 4
    w = _heavy_tailed((16, 4096), seed=3)
    scale, _ = weight_scale(w, bits, search="percentile")
    a = w.abs()
    clips = [a.amax(1)] + [torch.quantile(a.double(), p, dim=1).float() for p in PERCENTILES]
    errs = torch.stack([_weight_err(w, c / 7, None, bits) for c in clips])  # (candidates, rows)
    best = errs.argmin(0)
    expected = torch.stack(clips)[best, torch.arange(16)] / 7
    assert set(best.tolist()) >= {0, 1, 2}  # the example exercises several candidates
    assert torch.allclose(scale, expected, rtol=1e-6)
    assert bool((_weight_err(w, scale, None, bits) <= errs.min(0).values * (1 + 1e-5)).all())


def test_activation_percentile_and_absmax():
    x = _heavy_tailed((20000,), seed=1)
    s_mm, zp = activation_scale(x, 8)
    assert zp is None and s_mm.shape == () and torch.allclose(s_mm, x.abs().max() / 127)
    assert torch.allclose(activation_scale(x, 8, absmax=1000.0)[0], torch.tensor(1000.0 / 127))
    for search in ("percentile", "mse"):
        s, _ = activation_scale(x, 8, search=search)
        e = (fake_quant(x, s, None, 8) - x).square().sum()
        e_mm = (fake_quant(x, s_mm, None, 8) - x).square().sum()
        assert s.shape == () and float(e) <= float(e_mm)
    # the candidates are scored on the samples: a far-out absmax is clipped back by the search
    assert float(activation_scale(x, 8, search="mse", absmax=1e4)[0]) < 1e4 / 127


def test_mse_ratio_grid():
    assert MSE_RATIOS[0] == 1.0 and len(MSE_RATIOS) == 36 and abs(MSE_RATIOS[-1] - 0.3) < 1e-12


@pytest.mark.parametrize("search", ["minmax", "percentile", "mse"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_all_zero_groups_give_finite_results(search, symmetric):
    w = torch.zeros(4, 128)
    w[1] = torch.randn(128)
    scale, zp = weight_scale(w, 8, symmetric=symmetric, search=search)
    assert bool((scale > 0).all()) and bool(torch.isfinite(scale).all())
    out = fake_quant_weight(w, scale, zp, 8, symmetric)
    assert bool(torch.isfinite(out).all()) and bool((out[[0, 2, 3]] == 0).all())
    s, z = activation_scale(torch.zeros(100), 8, symmetric=symmetric, search=search)
    assert float(s) > 0 and bool(torch.isfinite(fake_quant(torch.zeros(3), s, z, 8, symmetric)).all())


def test_block_zero_blocks_finite():
    w = torch.randn(4, 128)
    w[:, :64] = 0
    scale, _ = weight_scale(w, 4, granularity="block", block_size=64, search="mse")
    assert bool((scale > 0).all()) and bool(torch.isfinite(fake_quant_weight(w, scale, None, 4)).all())


def test_rejects_bad_inputs():
    with pytest.raises(InputError):
        weight_scale(torch.randn(2, 3, 4), 8)
    with pytest.raises(InputError, match="NaN"):
        activation_scale(torch.tensor([1.0, float("nan")]), 8)
    with pytest.raises(InputError):
        activation_scale(torch.zeros(0), 8)
