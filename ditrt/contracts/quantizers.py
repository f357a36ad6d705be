"""The quantizers' semantics, shared by the torch simulation and the ONNX Q/DQ export.

Every quantizer rounds onto a :class:`ditrt.contracts.precisions.NumberFormat` (``fmt``; an int ``b``
means the ``b``-bit integer format), exactly as ONNX QuantizeLinear/DequantizeLinear define it, so the
simulation and the exported graph compute the same grid values:

- integers: ``q = clamp(round_half_even(x / scale) + zero_point, qmin, qmax)`` with
  ``qmin, qmax = -2^(b-1), 2^(b-1) - 1`` (signed; INT8 -128..127, INT4 -8..7);
- FP8 E4M3: ``q = cast_e4m3(clamp(x / scale, -448, 448))``, round to nearest, ties to even (ONNX
  QuantizeLinear with ``saturate=1`` and TensorRT's ``castToFp8(clip(x / s, -448, 448))``). The clamp
  is explicit because a cast of a larger value is not guaranteed to saturate (E4M3 "fn" has no
  infinity: an overflow is NaN). No zero point (FP8 zero points are 0).

``x_hat = (q - zero_point) * scale``. Weight scales of a Linear with weight (out, in) are ``(out,)``
per output channel, ``()`` per tensor, or ``(out, in // block)`` block-wise along the input
dimension. Pure tensor functions.
"""

from __future__ import annotations

import torch

from ditrt.contracts.errors import ConfigError
from ditrt.contracts.precisions import FORMATS, NumberFormat


def number_format(fmt: int | str | NumberFormat) -> NumberFormat:
    """The :class:`NumberFormat` ``fmt`` names: itself, a registry name (``"int8"``, ``"e4m3"``), or an
    integer width ``b`` (the signed ``b``-bit integers)."""
    if isinstance(fmt, NumberFormat):
        return fmt
    if isinstance(fmt, str):
        if fmt not in FORMATS:
            raise ConfigError(f"unknown number format {fmt!r}; choose one of: {', '.join(FORMATS)}")
        return FORMATS[fmt]
    return NumberFormat(f"int{int(fmt)}", int(fmt))


def qrange(fmt: int | NumberFormat, symmetric: bool = True) -> tuple[float, float]:
    """The grid's range: signed ``[-2^(b-1), 2^(b-1)-1]`` when symmetric, unsigned ``[0, 2^b-1]``
    otherwise; ``[-max, max]`` for a float format (symmetric only)."""
    f = number_format(fmt)
    if f.is_float:
        if not symmetric:
            raise ConfigError(f"{f.name.upper()} has no zero point: quantize it symmetrically (drop --asymmetric)")
        return -f.max, f.max
    if symmetric:
        return -(2 ** (f.bits - 1)), 2 ** (f.bits - 1) - 1
    return 0, 2**f.bits - 1


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, fmt, symmetric: bool = True) -> torch.Tensor:
    """Grid values (as a tensor of ``x``'s float type) of ``x / scale`` (+ zp) in format ``fmt``; scale broadcasts."""
    f = number_format(fmt)
    qmin, qmax = qrange(f, symmetric)
    if f.is_float:
        if zero_point is not None and bool((zero_point != 0).any()):
            raise ConfigError(f"{f.name.upper()} zero points must be 0")
        return _cast_e4m3((x / scale).clamp(qmin, qmax))
    q = torch.round(x / scale)
    if zero_point is not None:
        q = q + zero_point
    return q.clamp(qmin, qmax)


def _cast_e4m3(v: torch.Tensor) -> torch.Tensor:
    """Round ``v`` (within +-448) to the nearest E4M3 value, ties to even, back in ``v``'s float type
    (float16 and float32 hold every E4M3 value exactly)."""
    return v.to(torch.float8_e4m3fn).to(v.dtype)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None) -> torch.Tensor:
    return (q - zero_point) * scale if zero_point is not None else q * scale


def fake_quant(x, scale, zero_point, fmt, symmetric: bool = True) -> torch.Tensor:
    """Quantize then dequantize: what a Q -> DQ pair computes."""
    return dequantize(quantize(x, scale, zero_point, fmt, symmetric), scale, zero_point)


def expand_weight_scale(scale: torch.Tensor, weight_shape: torch.Size) -> torch.Tensor:
    """A ``()``, ``(out,)`` or ``(out, in // block)`` scale broadcast to the ``(out, in)`` weight."""
    out_f, in_f = weight_shape
    if scale.ndim == 0:
        return scale.reshape(1, 1)
    if scale.ndim == 1:
        return scale.view(out_f, 1)
    block = in_f // scale.shape[1]
    return scale.repeat_interleave(block, dim=1)


def fake_quant_weight(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, fmt, symmetric: bool = True):
    """Fake-quantize a Linear weight (out, in) with per-tensor, per-channel or block-wise scales."""
    s = expand_weight_scale(scale, w.shape)
    zp = None if zero_point is None else expand_weight_scale(zero_point, w.shape)
    return fake_quant(w, s, zp, fmt, symmetric)
