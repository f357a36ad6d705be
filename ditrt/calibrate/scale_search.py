"""Scale search: the scale (and zero point) of each weight group or activation tensor, by min-max,
PTQ4DiT's percentile clips or an MSE clip search. The quantizers themselves (their Q/DQ semantics)
are :mod:`ditrt.contracts.quantizers`; these are pure tensor functions too.
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
        elif search == "mse":
            his += [full * r for r in MSE_RATIOS[1:]]
        return [(None, h) for h in his]
    lo, hi = g.amin(dim=-1).clamp_max(0), g.amax(dim=-1).clamp_min(0)
    ranges = [(lo, hi)]
    if search == "percentile":
        qs = _quantiles(g, [1 - p for p in PERCENTILES] + list(PERCENTILES))
        k = len(PERCENTILES)
        ranges += [(torch.maximum(ql, lo).clamp_max(0), torch.minimum(qh, hi).clamp_min(0)) for ql, qh in zip(qs[:k], qs[k:])]
    elif search == "mse":
        ranges += [(lo * r, hi * r) for r in MSE_RATIOS[1:]]
    return ranges


def _search_scale(g: torch.Tensor, bits: int, symmetric: bool, search: str, absmax: torch.Tensor | None = None):
    """Per group of ``g`` (*S, n), the candidate scale with the lowest squared reconstruction error."""
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
        err = (fake_quant(g, scale[..., None], zpx, bits, symmetric) - g).square().sum(dim=-1)  # S
        if best_scale is None:
            best_scale, best_zp, best_err = scale, zp, err
            continue
        better = err < best_err  # strict: ties keep the earlier (wider) range
        best_scale = torch.where(better, scale, best_scale)
        best_zp = None if zp is None else torch.where(better, zp, best_zp)
        best_err = torch.where(better, err, best_err)
    return best_scale, best_zp


def weight_groups(w: torch.Tensor, granularity: str = "channel", block_size: int | None = None) -> torch.Tensor:
    """A Linear weight (out, in) as groups: (out, in) per channel, (out, in // block, block) block-wise."""
    if w.ndim != 2:
        raise InputError(f"a Linear weight must be 2-D (out, in), got shape {tuple(w.shape)}; flatten conv weights first")
    if granularity == "channel":
        return w.detach()
    if granularity != "block":
        raise ConfigError(f"unknown weight granularity {granularity!r}; choose 'channel' or 'block'")
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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point of a Linear weight (out, in).

    Returns scale ``(out,)`` per output channel or ``(out, in // block_size)`` block-wise, and the
    zero point (same shape, float, integer-valued) when asymmetric, else None. ``search``:
    "minmax" clips at max|w| of each group; "percentile" also tries the |w| quantiles
    :data:`PERCENTILES` (PTQ4DiT's init) and "mse" the clips ``max * r`` (:data:`MSE_RATIOS`),
    each keeping per group the candidate with the lowest L2 reconstruction error.
    """
    return _search_scale(weight_groups(w, granularity, block_size), bits, symmetric, search)


def activation_scale(
    samples: torch.Tensor,
    bits: int,
    *,
    symmetric: bool = True,
    search: str = "minmax",
    absmax: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-tensor scale ``()`` (and zero point ``()`` when asymmetric) of an activation.

    ``samples`` (any shape): a subset of the values the layer saw; candidate clips are scored on it.
    ``absmax``: the true running max |x| over everything seen, which replaces the subset's max as
    the widest candidate (symmetric only: a magnitude does not say which side an asymmetric range
    should widen, so asymmetric ranges come from the subset's min and max).
    """
    g = samples.detach().reshape(-1).float()
    if g.numel() == 0:
        raise InputError("no activation samples to calibrate on; run the calibration forward loop first")
    am = None if absmax is None or not symmetric else torch.as_tensor(absmax, dtype=torch.float32).reshape(())
    return _search_scale(g, bits, symmetric, search, am)
