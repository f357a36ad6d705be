"""Scale search: the scale (and zero point) of each weight group or activation tensor, by min-max,
PTQ4DiT's percentile clips, an MSE clip search of the tensor's own error, or an output-aware clip
search ("output") that scores each clip by the error it causes in the layer's *output* on recorded
inputs. The quantizers themselves (their Q/DQ semantics) are :mod:`ditrt.contracts.quantizers`; these
are pure tensor functions too. ``bits`` is the grid: an integer width or a number format (FP8 E4M3,
whose symmetric scale maps the clip to 448 instead of 127; it has no asymmetric form).

The output-aware search tries the MSE search's clips (:data:`MSE_RATIOS` of the full range) and keeps
the one with the lowest output error:

- weights, given the Gram matrix ``H = X^T X`` of the layer's inputs: ``dw H dw^T`` per output channel
  (``dw`` the rounding error of that row), the squared output error over the inputs ``X``; block-wise,
  each block is scored with its diagonal block of ``H`` (its cross terms with other blocks ignored);
- activations (symmetric, per tensor), given recorded input rows ``X``, the float weight ``W`` and the
  quantized weight ``W_q`` the layer will run with: ``|Q(X) W_q^T - X W^T|^2``, so the clip is chosen
  for the error the layer's output actually carries, weight error included.
"""

from __future__ import annotations

import torch

from ditrt.contracts.errors import ConfigError, InputError
from ditrt.contracts.quantizers import fake_quant, qrange
from ditrt.contracts.recipe import SEARCHES

# ---------------------------------------------------------------------------------------------
# Scale search. Every quantizer is calibrated over *groups*: a tensor (*S, n) whose last axis holds
# the n values that share one scale, S being the scale's shape ((out,), (out, in // block) or ()).

#: PTQ4DiT's initialisation tries these clip quantiles (and the max) and keeps the lowest L2 error.
PERCENTILES = (0.999, 0.9999, 0.99999)
#: "mse" tries max * r for r from 1.0 down to 0.3 (36 ratios, 0.02 apart).
MSE_RATIOS = tuple(1.0 - 0.02 * k for k in range(36))


def _check_search(search: str) -> None:
    if search not in SEARCHES:
        raise ConfigError(f"unknown scale search {search!r}; choose one of: {', '.join(SEARCHES)}")


def _quantiles(x: torch.Tensor, qs) -> list[torch.Tensor]:
    """Linear-interpolated quantiles along the last axis: (*S, n) -> [S, ...], one sort for all.

    Sort-based, because ``torch.quantile`` refuses inputs over 2^24 elements.
    """
    n = x.shape[-1]
    s = x.sort(dim=-1).values
    out = []
    for q in qs:
        pos = q * (n - 1)
        lo = int(pos)
        frac = pos - lo
        out.append(s[..., lo] * (1 - frac) + s[..., min(lo + 1, n - 1)] * frac)
    return out


def _scales_from_range(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool):
    """Scale (and zero point) that maps the clip range onto the integer grid.

    Symmetric: ``hi`` is the clip magnitude, ``scale = hi / qmax``, no zero point. Asymmetric:
    ``scale = (hi - lo) / (qmax - qmin)``, ``zp = clamp(round(-lo / scale), qmin, qmax)`` as float.
    A group whose range is 0 (all zeros) gets scale 1: any scale reproduces zeros exactly, and 1 stays
    representable in fp16 (1e-8 would flush to 0 and divide by zero in a half-precision Q/DQ).
    """
    qmin, qmax = qrange(bits, symmetric)
    span = hi if symmetric else hi - lo
    span = span / (qmax if symmetric else qmax - qmin)
    scale = torch.where(span > 0, span, torch.ones_like(span)).clamp_min(torch.finfo(torch.float32).tiny)
    if symmetric:
        return scale, None
    return scale, torch.round(-lo / scale).clamp(qmin, qmax)


def _candidates(g: torch.Tensor, symmetric: bool, search: str, absmax: torch.Tensor | None = None):
    """Clip ranges ``[(lo, hi), ...]`` (each of shape S) to try; the full range comes first.

    Symmetric candidates are magnitudes (``lo`` unused); asymmetric ones always include 0 so that
    zero stays exactly representable.
    """
    if symmetric:
        a = g.abs()
        full = a.amax(dim=-1) if absmax is None else absmax.to(a)
        his = [full]
        if search == "percentile":
            his += [torch.minimum(q, full) for q in _quantiles(a, PERCENTILES)]
        elif search in ("mse", "output"):
            his += [full * r for r in MSE_RATIOS[1:]]
        return [(None, h) for h in his]
    lo, hi = g.amin(dim=-1).clamp_max(0), g.amax(dim=-1).clamp_min(0)
    ranges = [(lo, hi)]
    if search == "percentile":
        qs = _quantiles(g, [1 - p for p in PERCENTILES] + list(PERCENTILES))
        k = len(PERCENTILES)
        ranges += [(torch.maximum(ql, lo).clamp_max(0), torch.minimum(qh, hi).clamp_min(0)) for ql, qh in zip(qs[:k], qs[k:])]
    elif search in ("mse", "output"):
        ranges += [(lo * r, hi * r) for r in MSE_RATIOS[1:]]
    return ranges


def _search_scale(g: torch.Tensor, bits: int, symmetric: bool, search: str, absmax: torch.Tensor | None = None, error=None):
    """Per group of ``g`` (*S, n), the candidate scale with the lowest error: ``error(g_hat - g)`` (S) when
    given (the output-aware search), else the squared reconstruction error of the group."""
    _check_search(search)
    g = g.float()
    if not bool(torch.isfinite(g).all()) or (absmax is not None and not bool(torch.isfinite(absmax).all())):
        raise InputError("cannot calibrate a scale on NaN or inf values; check the float model and its calibration inputs")
    best_scale = best_zp = best_err = None
    for lo, hi in _candidates(g, symmetric, search, absmax):
        scale, zp = _scales_from_range(lo, hi, bits, symmetric)
        if best_scale is None and search == "minmax":
            return scale, zp
        zpx = None if zp is None else zp[..., None]
        delta = fake_quant(g, scale[..., None], zpx, bits, symmetric) - g
        err = delta.square().sum(dim=-1) if error is None else error(delta)  # S
        if best_scale is None:
            best_scale, best_zp, best_err = scale, zp, err
            continue
        better = err < best_err  # strict: ties keep the earlier (wider) range
        best_scale = torch.where(better, scale, best_scale)
        best_zp = None if zp is None else torch.where(better, zp, best_zp)
        best_err = torch.where(better, err, best_err)
    return best_scale, best_zp


def weight_groups(w: torch.Tensor, granularity: str = "channel", block_size: int | None = None) -> torch.Tensor:
    """A Linear weight (out, in) as groups: (out, in) per channel, (out * in,) per tensor,
    (out, in // block, block) block-wise."""
    if w.ndim != 2:
        raise InputError(f"a Linear weight must be 2-D (out, in), got shape {tuple(w.shape)}; flatten conv weights first")
    if granularity == "channel":
        return w.detach()
    if granularity == "tensor":
        return w.detach().reshape(-1)
    if granularity != "block":
        raise ConfigError(f"unknown weight granularity {granularity!r}; choose 'channel', 'tensor' or 'block'")
    out_f, in_f = w.shape
    if not block_size or block_size <= 0 or in_f % block_size:
        raise ConfigError(
            f"block size {block_size} does not divide the input dimension {in_f}; "
            f"pick a divisor of {in_f} (e.g. 64 or 128) or use per-channel granularity"
        )
    return w.detach().reshape(out_f, in_f // block_size, block_size)


def weight_scale(
    w: torch.Tensor,
    bits: int,
    *,
    granularity: str = "channel",
    block_size: int | None = None,
    symmetric: bool = True,
    search: str = "minmax",
    gram: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point of a Linear weight (out, in).

    Returns scale ``(out,)`` per output channel, ``()`` per tensor or ``(out, in // block_size)`` block-wise, and the
    zero point (same shape, float, integer-valued) when asymmetric, else None. ``search``:
    "minmax" clips at max|w| of each group; "percentile" also tries the |w| quantiles
    :data:`PERCENTILES` (PTQ4DiT's init) and "mse" the clips ``max * r`` (:data:`MSE_RATIOS`),
    each keeping per group the candidate with the lowest L2 reconstruction error; "output" tries the
    clips of "mse" and keeps the one with the lowest output error ``dw H dw^T`` under ``gram`` (in, in),
    the Gram matrix ``X^T X`` of the layer's inputs (required for it).
    """
    groups = weight_groups(w, granularity, block_size)
    if search != "output":
        return _search_scale(groups, bits, symmetric, search)
    return _search_scale(groups, bits, symmetric, search, error=_weight_output_error(gram, w.shape, granularity, block_size))


def _weight_output_error(gram: torch.Tensor | None, shape, granularity: str, block_size: int | None):
    """``error(delta)`` of the output-aware weight search: ``delta`` (out, in) or (out, blocks, block) -> per group."""
    in_f = shape[-1]
    if gram is None:
        raise ConfigError("the output-aware weight search needs the Gram matrix of the layer's inputs (gram=X^T X)")
    if tuple(gram.shape) != (in_f, in_f):
        raise InputError(f"the Gram matrix must be ({in_f}, {in_f}) for a weight of {in_f} inputs, got {tuple(gram.shape)}")
    if not bool(torch.isfinite(gram).all()):
        raise InputError("the Gram matrix of the layer's inputs holds NaN or inf; check the float model and its calibration inputs")
    h = gram.float()
    if granularity == "channel":
        return lambda d: ((d @ h) * d).sum(dim=-1)
    if granularity == "tensor":
        return lambda d: ((d.reshape(shape) @ h) * d.reshape(shape)).sum()
    nb = in_f // block_size
    hb = torch.stack([h[i * block_size : (i + 1) * block_size, i * block_size : (i + 1) * block_size] for i in range(nb)])
    return lambda d: torch.einsum("onb,nbc,onc->on", d, hb, d)


def activation_scale(
    samples: torch.Tensor,
    bits: int,
    *,
    symmetric: bool = True,
    search: str = "minmax",
    absmax: float | torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    weight_q: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-tensor scale ``()`` (and zero point ``()`` when asymmetric) of an activation.

    ``samples`` (any shape): a subset of the values the layer saw; candidate clips are scored on it.
    ``absmax``: the true running max |x| over everything seen, which replaces the subset's max as
    the widest candidate (symmetric only: a magnitude does not say which side an asymmetric range
    should widen, so asymmetric ranges come from the subset's min and max).
    ``search="output"`` (symmetric only) scores each clip by the layer's output error on ``rows`` (N, in),
    recorded input rows: ``|Q(rows) weight_q^T - rows weight^T|^2``, with the float ``weight`` (out, in)
    and ``weight_q``, the quantized weight the layer runs with.
    """
    if search == "output":
        return _activation_output_scale(rows, weight, weight_q, bits, symmetric, absmax), None
    g = samples.detach().reshape(-1).float()
    if g.numel() == 0:
        raise InputError("no activation samples to calibrate on; run the calibration forward loop first")
    am = None if absmax is None or not symmetric else torch.as_tensor(absmax, dtype=torch.float32).reshape(())
    return _search_scale(g, bits, symmetric, search, am)


def _activation_output_scale(rows, weight, weight_q, bits: int, symmetric: bool, absmax) -> torch.Tensor:
    """The output-aware activation scale ``()`` (see :func:`activation_scale`); ties keep the wider clip."""
    if not symmetric:
        raise ConfigError("the output-aware activation search is symmetric only; use --act-search mse with --asymmetric")
    if rows is None or weight is None or weight_q is None:
        raise ConfigError("the output-aware activation search needs the layer's recorded input rows, its weight and its quantized weight")
    x, w, wq = rows.detach().float(), weight.detach().float(), weight_q.detach().float()
    if x.ndim != 2 or x.shape[-1] != w.shape[-1] or w.shape != wq.shape:
        raise InputError(f"output-aware search: rows {tuple(x.shape)}, weight {tuple(w.shape)} and quantized weight {tuple(wq.shape)} do not fit")
    if not bool(torch.isfinite(x).all()):
        raise InputError("cannot calibrate a scale on NaN or inf values; check the float model and its calibration inputs")
    full = x.abs().amax() if absmax is None else torch.as_tensor(absmax, dtype=torch.float32).reshape(()).to(x.device)
    ref = x @ w.T
    best, best_err = None, None
    for r in MSE_RATIOS:
        scale, _ = _scales_from_range(None, full * r, bits, True)
        err = float((fake_quant(x, scale, None, bits, True) @ wq.T - ref).square().sum())
        if best is None or err < best_err:  # strict: ties keep the earlier (wider) clip
            best, best_err = scale, err
    return best
