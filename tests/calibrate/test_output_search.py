"""The output-aware scale search ("output") picks, among the MSE search's clips, the one with the lowest
error in the quantized layer's output: checked against a brute-force search on constructed layers
whose inputs carry an outlier channel (where the tensor's own error and the output error disagree)."""

from __future__ import annotations

import pytest
import torch

from ditrt.calibrate.scale_search import MSE_RATIOS, activation_scale, weight_scale
from ditrt.contracts.errors import ConfigError, InputError
from ditrt.contracts.quantizers import fake_quant, fake_quant_weight, qrange


def _layer(seed=0, rows=512, cin=64, cout=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cin, generator=g)
    x[:, 3] *= 40.0  # an outlier input channel: the weight column it meets dominates the output error
    x[::50, 7] = 300.0  # and rare large activations on another channel
    w = torch.randn(cout, cin, generator=g) * 0.05
    w[:, 3] += torch.randn(cout, generator=g) * 0.02  # a column whose rounding the outlier channel amplifies
    w[:, 11] = torch.randn(cout, generator=g)  # a wide weight column that sets each row's max
    return x, w


def _brute_weight_scale(x, w, bits, block=None):
    """Per output row (and block), the candidate clip max|w| * r with the lowest output error on x,
    computed on the rows themselves (the search uses their Gram matrix)."""
    qmax = qrange(bits)[1]
    out, cin = w.shape
    block = block or cin
    groups = w.reshape(out, cin // block, block)
    xr = x.reshape(len(x), cin // block, block)
    full = groups.abs().amax(-1)  # (out, nb)
    errs = []
    for r in MSE_RATIOS:
        s = full * r / qmax
        dw = fake_quant(groups, s[..., None], None, bits) - groups
        errs.append(torch.einsum("nbk,obk->nob", xr, dw).square().sum(0))  # (out, nb)
    k = torch.stack(errs).argmin(0)  # first minimum: ties keep the wider clip, as the search does
    best = full * torch.tensor(MSE_RATIOS)[k] / qmax
    return best if block != cin else best[:, 0]


@pytest.mark.parametrize("bits,block", [(8, None), (4, 16)])
def test_output_aware_weight_scales_are_the_brute_force_argmin(bits, block):
    x, w = _layer()
    gram = x.T @ x
    kw = {"granularity": "block", "block_size": block} if block else {}
    scale, zp = weight_scale(w, bits, search="output", gram=gram, **kw)
    assert zp is None
    torch.testing.assert_close(scale, _brute_weight_scale(x, w, bits, block), rtol=1e-6, atol=0)
    mse, _ = weight_scale(w, bits, search="mse", **kw)
    assert not torch.equal(scale, mse)  # the two objectives disagree on this layer

    def out_err(s):
        return float((x @ (fake_quant_weight(w, s, None, bits) - w).T).square().sum())

    assert out_err(scale) <= out_err(mse) and out_err(scale) <= out_err(weight_scale(w, bits, **kw)[0])


def test_output_aware_activation_scale_is_the_brute_force_argmin_against_the_quantized_weight():
    x, w = _layer(seed=1)
    wscale, _ = weight_scale(w, 8)
    wq = fake_quant_weight(w, wscale, None, 8)
    absmax = x.abs().amax()
    scale, zp = activation_scale(x.reshape(-1)[:1000], 8, search="output", absmax=absmax, rows=x, weight=w, weight_q=wq)
    ref = x @ w.T
    errs = [float((fake_quant(x, absmax * r / 127, None, 8) @ wq.T - ref).square().sum()) for r in MSE_RATIOS]
    k = min(range(len(errs)), key=errs.__getitem__)
    assert zp is None and scale.shape == ()
    torch.testing.assert_close(scale, absmax * MSE_RATIOS[k] / 127, rtol=1e-6, atol=0)
    assert errs[k] < errs[0]  # it does clip here: the rare 300s cost less than the rounding they force on the rest


def test_output_aware_search_refuses_what_it_cannot_score():
    x, w = _layer()
    with pytest.raises(ConfigError, match="Gram matrix"):
        weight_scale(w, 8, search="output")
    with pytest.raises(InputError, match=r"\(64, 64\)"):
        weight_scale(w, 8, search="output", gram=torch.eye(10))
    with pytest.raises(InputError, match="NaN"):
        weight_scale(w, 8, search="output", gram=torch.full((64, 64), float("nan")))
    with pytest.raises(ConfigError, match="recorded input rows"):
        activation_scale(x, 8, search="output", absmax=1.0)
    with pytest.raises(ConfigError, match="symmetric only"):
        activation_scale(x, 8, search="output", symmetric=False, rows=x, weight=w, weight_q=w)
    with pytest.raises(InputError, match="do not fit"):
        activation_scale(x, 8, search="output", rows=x[:, :10], weight=w, weight_q=w)
