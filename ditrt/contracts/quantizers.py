"""The quantizers' semantics, shared by the torch simulation and the ONNX Q/DQ export.

``q = clamp(round_half_even(x / scale) + zero_point, qmin, qmax)``, ``x_hat = (q - zero_point) * scale``
with ``qmin, qmax = -2^(b-1), 2^(b-1) - 1`` (signed; INT8 -128..127, INT4 -8..7), exactly as ONNX
QuantizeLinear/DequantizeLinear define them, so the simulation and the exported graph compute the
same integers. Weight scales of a Linear with weight (out, in) are ``(out,)`` per output channel
or ``(out, in // block)`` block-wise along the input dimension. Pure tensor functions.
"""

from __future__ import annotations

import torch


def qrange(bits: int, symmetric: bool = True) -> tuple[int, int]:
    """Signed ``[-2^(b-1), 2^(b-1)-1]`` when symmetric, unsigned ``[0, 2^b-1]`` otherwise."""
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, bits: int, symmetric: bool = True) -> torch.Tensor:
    """Integers (as float tensor) ``clamp(round_half_even(x / scale) + zp, qmin, qmax)``; scale broadcasts."""
    qmin, qmax = qrange(bits, symmetric)
    q = torch.round(x / scale)
    if zero_point is not None:
        q = q + zero_point
    return q.clamp(qmin, qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None) -> torch.Tensor:
    return (q - zero_point) * scale if zero_point is not None else q * scale


def fake_quant(x, scale, zero_point, bits: int, symmetric: bool = True) -> torch.Tensor:
    """Quantize then dequantize: what a Q -> DQ pair computes."""
    return dequantize(quantize(x, scale, zero_point, bits, symmetric), scale, zero_point)


def expand_weight_scale(scale: torch.Tensor, weight_shape: torch.Size) -> torch.Tensor:
    """A ``(out,)`` or ``(out, in // block)`` scale broadcast to the ``(out, in)`` weight."""
    out_f, in_f = weight_shape
    if scale.ndim == 1:
        return scale.view(out_f, 1)
    block = in_f // scale.shape[1]
    return scale.repeat_interleave(block, dim=1)


def fake_quant_weight(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, bits: int, symmetric: bool = True):
    """Fake-quantize a Linear weight (out, in) with per-channel or block-wise scales."""
    s = expand_weight_scale(scale, w.shape)
    zp = None if zero_point is None else expand_weight_scale(zero_point, w.shape)
    return fake_quant(w, s, zp, bits, symmetric)
