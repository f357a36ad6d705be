"""GPTQ weight rounding on fixed grids: Hessian-based error compensation (Frantar et al. 2022, "GPTQ:
Accurate Post-Training Quantization for Generative Pre-trained Transformers", Algorithm 1).

A Linear ``y = x W^T`` with weight (out, in) and calibration inputs ``X`` has the layer-wise objective
``||X W^T - X Wq^T||^2 = tr(dW H dW^T)`` with ``H = X^T X``. GPTQ quantizes the input columns one at a
time and spreads each column's rounding error over the columns not yet quantized, weighted by the
inverse Hessian (the OBS update); the rows share one inverse Hessian, so all rows are done at once.
Its Cholesky form (upper factor of the damped ``H^-1``) and lazy batch updates over ``columns`` columns
are the paper's sections 3.2-3.3.

Unlike the paper, the grid is given: the caller's scales (TensorRT's grids: INT8 per output channel
``(out,)``, INT4 blocks along the input dimension ``(out, in // block)``, symmetric, zero point 0), and
each column is rounded exactly as :func:`ditrt.contracts.quantizers.fake_quant_weight` rounds it
(round half to even, clamp to the signed range). So the result is an ordinary weight on its grid: the
recipe keeps its scales and exports like any round-to-nearest recipe. With act_order the columns run by
descending ``H_jj``; a column keeps its own scale wherever it runs.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from ditrt.calibrate.observe import OBSERVE_ROWS, observe_input_grams
from ditrt.contracts.errors import ConfigError, InputError
from ditrt.contracts.quantizers import expand_weight_scale, fake_quant_weight, number_format, quantize
from ditrt.diffusion.recording import CalibBatch
from ditrt.distributed import SINGLE, World, map_items

log = logging.getLogger(__name__)

#: The float64 Gram matrices one observation pass of :func:`gptq_weights` holds at most (by default).
#: DiT-XL/2's 112 block Linears need 5.7 GB of them (84 x 10.6 MB at C = 1152, 28 x 170 MB for fc2 at
#: C = 4608), so they are observed in 4 passes; the built-in model's 24 (2.4 MB in all) in one.
GRAM_BUDGET_BYTES = 1536 * 2**20


def _check_grid(weight: torch.Tensor, scale: torch.Tensor, bits, block_size: int | None) -> torch.Tensor:
    """Validate a weight and its grid (``bits``: an integer width or a number format, e.g. FP8 E4M3);
    returns the scale expanded to the weight (out, in)."""
    if weight.ndim != 2:
        raise InputError(f"GPTQ takes a Linear weight (out, in), got shape {tuple(weight.shape)}; flatten conv weights first")
    out_f, in_f = weight.shape
    fmt = number_format(bits)
    if not fmt.is_float and not 2 <= fmt.bits <= 16:
        raise ConfigError(f"GPTQ rounds onto signed 2- to 16-bit grids, got {fmt.bits} bits")
    if scale.ndim == 1 and block_size:
        raise InputError(f"a per-channel scale of shape {tuple(scale.shape)} was given with block size {block_size}; "
                         f"pass block-wise scales (out, in // {block_size}) or no block size")  # fmt: skip
    if scale.ndim == 0:
        ok = not block_size  # one scale for the whole weight
    elif scale.ndim == 1:
        ok = tuple(scale.shape) == (out_f,)
    else:
        block = block_size or (in_f // scale.shape[1] if scale.ndim == 2 and scale.shape[1] else 0)
        ok = scale.ndim == 2 and block > 0 and in_f % block == 0 and tuple(scale.shape) == (out_f, in_f // block)
    if not ok:
        raise InputError(f"weight scale of shape {tuple(scale.shape)} fits no grid of a ({out_f}, {in_f}) weight"
                         f"{f' in blocks of {block_size}' if block_size else ''}; pass ({out_f},) per output channel "
                         f"or ({out_f}, in // block) block-wise, or () per tensor")  # fmt: skip
    for what, t in (("weight", weight), ("weight scale", scale)):
        if not bool(torch.isfinite(t).all()):
            raise InputError(f"the {what} holds NaN or inf values; check the float model and its calibration inputs")
    if not bool((scale > 0).all()):
        raise InputError("weight scales must be positive; compute them with ditrt.calibrate.scale_search.weight_scale")
    return expand_weight_scale(scale, weight.shape).expand(out_f, in_f)


def _check_hessian(weight: torch.Tensor, hessian: torch.Tensor) -> None:
    in_f = weight.shape[1]
    if tuple(hessian.shape) != (in_f, in_f):
        raise InputError(f"the Hessian must be (in, in) = ({in_f}, {in_f}) for a weight of shape {tuple(weight.shape)}, "
                         f"got {tuple(hessian.shape)}; pass the Gram matrix of this layer's inputs")  # fmt: skip
    if not bool(torch.isfinite(hessian).all()):
        raise InputError("the Hessian holds NaN or inf values; check the float model and its calibration inputs")


def _decoupled(hessian: torch.Tensor) -> torch.Tensor:
    """``hessian`` in float64 with the diagonal of its dead columns (``H_jj = 0``: no calibration input
    reaches them) set to 1, as in the paper's reference code: such a column is then decoupled from the
    others (its row and column are zero), so its rounding error is not propagated and nothing reaches it."""
    h = hessian.to(torch.float64).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    return h


def _inverse_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """The upper Cholesky factor U of ``(h + damp * mean(diag h) * I)^-1`` (float64; ``h`` is damped in place)."""
    diag = torch.diagonal(h)
    diag += damp * diag.mean()
    factor, info = torch.linalg.cholesky_ex(h)
    if int(info):
        raise InputError(f"the Hessian is not positive definite even with damping {damp}; pass the Gram matrix X^T X "
                         "of the layer's inputs (symmetric, positive semi-definite) or raise damp")  # fmt: skip
    upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(factor), upper=True)
    if int(info):
        raise InputError(f"the damped Hessian is too ill-conditioned to invert (damping {damp}); raise damp")
    return upper


def gptq_integers(weight, hessian, scale, bits, *, block_size: int | None = None, damp: float = 0.01,
                  columns: int = 128, act_order: bool = True) -> torch.Tensor:  # fmt: skip
    """The grid values of :func:`gptq_round` (float64, shaped like ``weight``): integers within the signed
    ``bits`` range, or values of the float format ``bits`` names (FP8 E4M3); ``gptq_round`` is ``q * scale``.
    Small to send between processes (:func:`_compact`)."""
    s32 = _check_grid(weight, scale, bits, block_size).to(device=weight.device, dtype=torch.float32)
    _check_hessian(weight, hessian)
    if damp < 0:
        raise ConfigError(f"GPTQ's damping is a non-negative fraction of the mean Hessian diagonal, got {damp}")
    if columns < 1:
        raise ConfigError(f"GPTQ's lazy batch must hold at least one column, got {columns}")
    fmt = number_format(bits)
    hessian = hessian.to(weight.device)
    h = _decoupled(hessian)
    w = weight.detach().to(torch.float64).clone()  # (out, in), updated in place as columns are quantized
    order = None
    if act_order:  # run the columns by descending H_jj: permute everything; each column keeps its scale
        order = torch.argsort(torch.diagonal(hessian), descending=True, stable=True)
        h, w, s32 = h[order][:, order], w[:, order], s32[:, order]
    s = s32.double()
    upper = _inverse_factor(h, damp)
    del h
    q = torch.empty_like(w)
    n = w.shape[1]
    for a in range(0, n, columns):
        b = min(a + columns, n)
        block, u = w[:, a:b], upper[a:b, a:b]  # a view: updates land in w
        errors = torch.empty_like(block)
        for j in range(b - a):
            col = block[:, j]
            # fake_quant_weight's grid value of the column's float32 value: with nothing to compensate
            # (an identity Hessian) the result is round to nearest bit for bit
            qj = quantize(col.float(), s32[:, a + j], None, fmt).double()
            q[:, a + j] = qj
            errors[:, j] = (col - qj * s[:, a + j]) / u[j, j]
            block[:, j:] -= errors[:, j : j + 1] * u[j : j + 1, j:]  # OBS update of this batch's remaining columns
        w[:, b:] -= errors @ upper[a:b, b:]  # the lazy update of every later column
    return q if order is None else q[:, torch.argsort(order)]


def gptq_round(weight: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, bits, *, block_size: int | None = None,
               damp: float = 0.01, columns: int = 128, act_order: bool = True) -> torch.Tensor:  # fmt: skip
    """GPTQ-rounded ``weight`` (out, in) on the fixed grid ``scale``, float32 on the weight's device.

    ``hessian`` (in, in): the Gram matrix ``X^T X`` of the layer's inputs (any positive factor: the damping
    is relative); ``scale``: ``(out,)`` per output channel or ``(out, in // block_size)`` block-wise
    (``block_size`` may be left None: the scale's shape gives it), symmetric with zero point 0. ``damp``:
    added to the Hessian's diagonal as a fraction of its mean (the paper's lambda); ``columns``: the lazy
    batch (the paper's B = 128); ``act_order``: quantize the columns by descending ``H_jj``. Dead columns
    (``H_jj = 0``) are rounded to nearest and left out of the compensation (the reference code also
    zeroes their weights; rounding them keeps the float model's behaviour on inputs that do reach them).

    The result is ``q * scale`` computed in float32 as :func:`ditrt.contracts.quantizers.fake_quant_weight`
    computes it, with ``q`` on the grid of ``bits`` (an integer width, or a float format such as FP8 E4M3):
    ``fake_quant_weight(result, scale, None, bits)``
    returns it unchanged. Computed in float64 on the weight's device. Raises InputError on a Hessian or
    scale of the wrong shape and on NaN or inf values."""
    q = gptq_integers(weight, hessian, scale, bits, block_size=block_size, damp=damp, columns=columns, act_order=act_order)
    return _dequantize(q, scale.to(weight.device))


def _compact(q: torch.Tensor, bits) -> torch.Tensor:
    """Grid values in their smallest exact type: int8 up to 8 integer bits, float8 E4M3 for E4M3 (both exact)."""
    fmt = number_format(bits)
    if fmt.is_float:
        return q.to(torch.float8_e4m3fn)
    return q.to(torch.int8) if fmt.bits <= 8 else q


def _dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * expand_weight_scale(scale.float(), q.shape)


def output_error(weight: torch.Tensor, rounded: torch.Tensor, hessian: torch.Tensor) -> float:
    """The relative output error proxy ``tr(dW H dW^T) / tr(W H W^T)`` of ``rounded`` against ``weight``
    (``||X dW^T||^2 / ||X W^T||^2`` on the inputs whose Gram matrix is ``hessian``), in float64."""
    h = hessian.to(torch.float64)
    w = weight.detach().to(h)
    dw = rounded.detach().to(h) - w
    signal = float(((w @ h) * w).sum())
    return float(((dw @ h) * dw).sum()) / signal if signal > 0 else 0.0


def _passes(model: nn.Module, layers: list[str], layers_per_pass: int | None) -> list[list[str]]:
    """The layers in observation passes: ``layers_per_pass`` at a time, or by default as many consecutive
    layers as keep the pass's float64 Gram matrices within :data:`GRAM_BUDGET_BYTES` (at least one)."""
    if layers_per_pass is not None:
        if layers_per_pass < 1:
            raise ConfigError(f"layers_per_pass must be at least 1, got {layers_per_pass}")
        return [layers[i : i + layers_per_pass] for i in range(0, len(layers), layers_per_pass)]
    passes: list[list[str]] = [[]]
    held = 0
    for name in layers:
        size = 8 * model.get_submodule(name).weight.shape[1] ** 2
        if passes[-1] and held + size > GRAM_BUDGET_BYTES:
            passes.append([])
            held = 0
        passes[-1].append(name)
        held += size
    return passes if passes[0] else []


def gptq_weights(
    model: nn.Module,
    layers: list[str],
    batches: list[CalibBatch],
    scales: dict[str, torch.Tensor],
    bits,
    blocks: dict[str, int],
    *,
    device: str = "cpu",
    world: World = SINGLE,
    progress: bool = False,
    layers_per_pass: int | None = None,
    rows: int = OBSERVE_ROWS,
    **gptq_options,
) -> tuple[dict[str, torch.Tensor], dict]:
    """GPTQ-rounded weights of the named Linears of ``model`` (the float model, balanced if the method
    balances; on ``device``), on the grids ``scales[name]`` (``(out,)`` where ``blocks[name] == 0``, else
    ``(out, in // blocks[name])``), with the Hessians of their float inputs over ``batches``.

    Returns ``({layer: rounded weight (CPU float32)}, report)``; the report holds per layer the relative
    output error proxy ``tr(dW H dW^T) / tr(W H W^T)`` of round-to-nearest (``rtn``) and of GPTQ (``gptq``)
    on the same scales and the seconds GPTQ took, and their means over layers. ``gptq_options`` go to
    :func:`gptq_round` (damp, columns, act_order).

    Memory: the inputs' float64 Gram matrices are observed ``layers_per_pass`` layers at a time (one pass
    over ``batches`` each); by default as many as fit in :data:`GRAM_BUDGET_BYTES` (1.5 GB: DiT-XL/2's 112
    block Linears, 5.7 GB of Gram matrices, take 4 passes; smaller models one). GPTQ of one layer adds
    three (in, in) float64 matrices and two float64 copies of its weight (DiT-XL/2's fc2: 0.5 GB + 85 MB).

    In a torchrun job every rank passes the same arguments: each runs its slices of every observation
    pass (the Gram matrices then equal a single process's up to float64 summation order, see
    :func:`ditrt.calibrate.observe.observe_input_grams`) and its share of the layers, and every rank gets
    every weight."""
    for name in layers:
        if name not in scales or name not in blocks:
            raise ConfigError(f"GPTQ needs a weight scale and a block size (0: per channel) for every layer; {name!r} has "
                              f"{'no scale' if name not in scales else 'no block size'}")  # fmt: skip
        _check_grid(model.get_submodule(name).weight, scales[name], bits, blocks[name] or None)  # before any pass
    plan = _passes(model, layers, layers_per_pass)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(layers), desc=f"GPTQ of {len(layers)} layers in {len(plan)} pass(es)", unit="layer")
    weights: dict[str, torch.Tensor] = {}
    per_layer: dict[str, dict] = {}
    observe_seconds = 0.0
    try:
        for names in plan:
            start = time.perf_counter()
            grams = observe_input_grams(model, names, batches, device=device, world=world, rows=rows)
            observe_seconds += time.perf_counter() - start

            def one(name: str):
                w = model.get_submodule(name).weight.detach().to(device)
                scale, h = scales[name].to(device), grams[name]
                begin = time.perf_counter()
                q = gptq_integers(w, h, scale, bits, block_size=blocks[name] or None, **gptq_options)
                seconds = time.perf_counter() - begin
                record = {"rtn": output_error(w, fake_quant_weight(w.float(), scale, None, bits), h),
                          "gptq": output_error(w, _dequantize(q, scale), h), "seconds": seconds}  # fmt: skip
                if bar is not None:
                    bar.update(1)
                return _compact(q, bits).cpu(), record

            for name, (q, record) in zip(names, map_items(one, names, world)):
                weights[name] = _dequantize(q, scales[name].cpu())
                per_layer[name] = record
            grams.clear()  # free this pass's Gram matrices before the next pass observes its own
            if bar is not None:  # every rank's layers of this pass are done
                bar.n = len(per_layer)
                bar.refresh()
    finally:
        if bar is not None:
            bar.close()
    means = {k: sum(r[k] for r in per_layer.values()) / max(1, len(per_layer)) for k in ("rtn", "gptq")}
    log.info("GPTQ of %d layers: mean relative output error %.3g (round to nearest: %.3g)", len(per_layer), means["gptq"], means["rtn"])
    report = {
        "per_layer": per_layer,
        "rtn_mean": means["rtn"],
        "gptq_mean": means["gptq"],
        "passes": len(plan),
        "observe_seconds": observe_seconds,
        "options": dict(gptq_options),
    }
    return weights, report
