"""DiTAS smoothing: temporal-aggregated SmoothQuant factors with a per-layer alpha search.

Dong et al., "DiTAS: Quantizing Diffusion Transformers via Enhanced Activation Smoothing" (WACV 2025),
written from the paper, not its code. Per input channel j of a balanced Linear, the activation
salience ``a_j`` is the largest |x_j| over *all* timesteps, tokens and samples of the calibration run
(temporal aggregation; PTQ4DiT's SSC weighs timesteps instead), and the divisor is
``d_j = a_j^alpha / max|W col j|^(1 - alpha)`` with alpha chosen per layer from :data:`ALPHA_GRID` to
minimise the quantized layer's output error on recorded inputs.

Same convention as :mod:`ditrt.calibrate.balance`: the input is divided by ``d`` and the weight
columns multiplied by it; ``balance.apply_balance`` folds ``d`` into adaLN or the V rows, and a block's
fc2 (searched the same way when it is smoothed at run time) keeps ``d`` as a run-time multiply
(``balance.smooth_at_run_time``). Unlike the
released code (which quantizes W before smoothing and so leaves the stored weight off the grid),
the weight is quantized *after* smoothing, as the exported model will be.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ditrt.calibrate import balance as B
from ditrt.calibrate.observe import capture_layer_inputs
from ditrt.calibrate.scale_search import activation_scale, weight_scale
from ditrt.contracts.quantizers import fake_quant, fake_quant_weight
from ditrt.diffusion.recording import CalibBatch
from ditrt.distributed import SINGLE, World, map_items

#: The paper's alpha grid {0, 0.05, ..., 1}.
ALPHA_GRID = tuple(round(0.05 * i, 2) for i in range(21))


def ditas_factor(act_max: torch.Tensor, w_col_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """DiTAS divisor ``d_j = act_max_j^alpha / w_col_max_j^(1 - alpha)``: (C,), (C,) -> (C,).

    The SmoothQuant form on the temporally aggregated salience. Channels where it is undefined (a zero
    or non-finite maximum, or an underflow to 0) get 1, so every factor can be folded.
    """
    d = B.smoothquant_factors(act_max, w_col_max, alpha=alpha)
    return torch.where(d > 0, d, torch.ones_like(d))


# ----------------------------------------------------------------------------------- search


def _as_float(
    x_rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The layer's rows, weight and bias in float32 (the search never runs in half precision)."""
    return x_rows.float(), weight.float(), None if bias is None else bias.float()


def _mse(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).square().mean())


@dataclass(frozen=True)
class LayerQuant:
    """How a smoothed layer is quantized: symmetric ``w_bits`` weights (per output channel, per tensor, or
    block-wise with ``block_size``) and, unless ``a_bits`` is None, a per-tensor symmetric activation
    quantizer; weight scales found with ``search``, activation scales with ``act_search`` (None: ``search``
    too). ``w_bits``/``a_bits``: integer widths or number formats (:mod:`ditrt.contracts.quantizers`)."""

    w_bits: object
    a_bits: object | None
    granularity: str = "channel"
    block_size: int | None = None
    search: str = "minmax"
    act_search: str | None = None

    def output(
        self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, d: torch.Tensor, act_absmax: torch.Tensor | None
    ) -> torch.Tensor:
        """``Q(x / d) Q(W * d)^T + b``: W is quantized after smoothing, as the exported model stores it.
        The output-aware searches score their clips on ``x`` itself (the Gram matrix of ``x / d`` for the
        weight, the rows ``x / d`` for the activation): the rows the alpha search judges the layer on."""
        xs, ws = x / d, w * d[None, :]
        gram = xs.T @ xs if self.search == "output" else None
        w_scale, _ = weight_scale(ws, self.w_bits, granularity=self.granularity, block_size=self.block_size, search=self.search, gram=gram)
        wq = fake_quant_weight(ws, w_scale, None, self.w_bits)
        if self.a_bits is not None:
            absmax = xs.abs().max() if act_absmax is None else act_absmax
            act_search = self.act_search or self.search
            rows = {"rows": xs, "weight": ws, "weight_q": wq} if act_search == "output" else {}
            a_scale, _ = activation_scale(xs, self.a_bits, search=act_search, absmax=absmax, **rows)
            xs = fake_quant(xs, a_scale, None, self.a_bits)
        return F.linear(xs, wq, b)


def layer_output_error(
    x_rows: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    d: torch.Tensor,
    quant: LayerQuant,
    *,
    act_absmax: torch.Tensor | None = None,
) -> float:
    """Mean squared error of the quantized layer smoothed by ``d`` against the float layer on ``x_rows`` (N, C).

    ``W * d`` is quantized after smoothing (per output channel or block-wise); ``x / d`` per tensor at
    ``quant.a_bits`` (None: activations stay float). ``act_absmax``: the true max |x / d| over everything the
    layer saw, the widest activation clip (default: the max over ``x_rows``, which may miss outliers).
    """
    x, w, b = _as_float(x_rows, weight, bias)
    return _mse(quant.output(x, w, b, d.to(x), act_absmax), F.linear(x, w, b))


def search_alpha(
    x_rows: torch.Tensor,
    channel_max: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    quant: LayerQuant,
    *,
    grid: tuple[float, ...] = ALPHA_GRID,
    include_identity: bool = True,
) -> tuple[torch.Tensor, float | None, list[float]]:
    """DiTAS' per-layer alpha: the divisor with the lowest :func:`layer_output_error` on ``x_rows``.

    Candidates in order: ``d = 1`` (no smoothing, alpha None) when ``include_identity``, then
    :func:`ditas_factor` of ``channel_max`` and the weight's column maxima for each alpha of ``grid``.
    The activation clip of each candidate is ``max_j channel_max_j / d_j``, the range the deployed
    quantizer will be calibrated on. Returns ``(d (C,), alpha or None, errors per candidate)``; ties
    keep the earlier candidate.
    """
    w_col_max = B.weight_salience(weight.float())
    candidates: list[tuple[float | None, torch.Tensor]] = [(None, torch.ones_like(w_col_max))] if include_identity else []
    candidates += [(alpha, ditas_factor(channel_max.to(w_col_max), w_col_max, alpha)) for alpha in grid]
    x, w, b = _as_float(x_rows, weight, bias)
    ref = F.linear(x, w, b)  # the float output, once for all candidates
    errors = [_mse(quant.output(x, w, b, d.to(x), (channel_max.to(d) / d).max()), ref) for _, d in candidates]
    best = min(range(len(errors)), key=errors.__getitem__)  # first index of the minimum: ties keep the earlier
    alpha, d = candidates[best]
    return d, alpha, errors


def ditas_factors(
    model: nn.Module,
    layers: list[str],
    batches: list[CalibBatch],
    quant: LayerQuant,
    *,
    grid: tuple[float, ...] = ALPHA_GRID,
    tokens_per_batch: int = 64,
    seed: int = 0,
    device: str = "cpu",
    reports: dict | None = None,
    world: World = SINGLE,
) -> tuple[dict[str, torch.Tensor], dict[str, float | None]]:
    """DiTAS divisors of the balanced ``layers``: ``({layer: d (C,) on the CPU}, {layer: alpha or None})``.

    Inputs are captured once, on the unmodified model, and every layer is searched independently, so
    the factors can all be folded together afterwards (``balance.apply_balance``). The search runs on ``device``.
    ``reports``: if given, filled with a :class:`ditrt.calibrate.balance.BalanceReport` per layer (the
    channels whose temporal-aggregated or weight salience was degenerate keep d = 1). In a torchrun
    ``world`` the ranks share the capture's slices and the layers' searches; every rank gets every result.
    """
    captured = capture_layer_inputs(model, layers, batches, tokens_per_batch=tokens_per_batch, seed=seed, device=device, world=world)

    def search(name: str):
        linear, seen = model.get_submodule(name), captured[name]
        weight = linear.weight.detach()
        bias = None if linear.bias is None else linear.bias.detach()
        d, alpha, _ = search_alpha(seen.rows.to(device), seen.channel_max.to(device), weight, bias, quant, grid=grid)
        d = d.cpu()
        return d, alpha, B.BalanceReport.of(name, d, seen.channel_max.cpu(), B.weight_salience(weight.float().cpu()))

    results = dict(zip(layers, map_items(search, layers, world)))
    if reports is not None:
        reports.update({name: report for name, (_, _, report) in results.items()})
    return {n: d for n, (d, _, _) in results.items()}, {n: a for n, (_, a, _) in results.items()}
