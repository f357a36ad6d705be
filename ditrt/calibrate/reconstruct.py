"""BRECQ-style block reconstruction, as Q-Diffusion and PTQ4DiT run it after the scales are calibrated.

For each DiT block in order, the block's quantized Linears are tuned so that the block, fed the output
of the already quantized (and reconstructed) prefix, reproduces what the float block computes on float
inputs. Two things are learned, nothing else:

- the rounding of every weight (AdaRound): ``W_soft = s * clamp(floor(W / s) + h(V), qmin, qmax)`` with
  ``h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)``, started at the fractional part of ``W / s``
  and pushed to 0 or 1 by the regulariser ``sum(1 - |2h - 1|^b)`` whose exponent ``b`` anneals after a
  warm-up; the weight scales ``s`` stay fixed;
- the per-tensor input step sizes (LSQ): ``x_hat = clamp(round(x / s), qmin, qmax) * s`` with the
  gradient of ``round`` taken as the identity.

The result is an ordinary recipe: each reconstructed weight is written back on its integer grid
(``s * k``), so plain round-to-nearest (:func:`ditrt.contracts.quantizers.fake_quant_weight`, the ONNX
QuantizeLinear) reproduces the learned rounding exactly, and the learned input scales replace the
calibrated ones.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ditrt.calibrate.config import RECONSTRUCT_FLOAT
from ditrt.contracts.errors import ConfigError, InputError
from ditrt.contracts.quantizers import expand_weight_scale, qrange
from ditrt.contracts.recipe import Recipe
from ditrt.diffusion.recording import CalibBatch
from ditrt.models.quantized import QuantLinear, quantized_model, set_module

log = logging.getLogger(__name__)

#: AdaRound's rectified-sigmoid stretch: h reaches exactly 0 and 1 at finite V.
ZETA, GAMMA = 1.1, -0.1
#: Rows per forward when whole calibration sets go through a block (targets, errors, next inputs).
EVAL_ROWS = 64
#: A learned step size never drops below the smallest normal fp16 (a half-precision Q/DQ divides by it).
MIN_ACT_SCALE = torch.finfo(torch.float16).tiny


@dataclass(frozen=True)
class ReconstructSettings:
    """Reconstruction hyper-parameters (defaults: Q-Diffusion's, except the iteration count).

    ``iters`` is per block. The default (250) reconstructs the built-in model (6 blocks, hidden 192,
    64 tokens) on 25 calibration batches of 64 rows in about 4 minutes on one CPU thread. For DiT-XL/2
    on one GPU use the paper's setting, ``iters=20000, batch_size=32`` (28 blocks). Each AdaRound
    variable moves at most about ``lr_weight`` per step, so a short run only re-decides weights whose
    ``W / s`` lies near a rounding midpoint; raise ``lr_weight`` when ``iters`` must stay small.
    ``warmup`` is the fraction of ``iters`` run without the rounding regulariser; afterwards its
    exponent ``b`` falls linearly from ``b_start`` to ``b_end``.
    """

    iters: int = 250
    batch_size: int = 32
    lr_weight: float = 1e-3
    lr_act: float = 4e-5
    reg_weight: float = 0.01
    b_start: float = 20.0
    b_end: float = 2.0
    warmup: float = 0.2
    seed: int = 0

    def __post_init__(self):
        if self.iters < 1 or self.batch_size < 1:
            raise ConfigError(f"reconstruction needs iters >= 1 and batch_size >= 1, got {self.iters} and {self.batch_size}")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"reconstruction warm-up is a fraction of the iterations in [0, 1), got {self.warmup}")
        if not self.b_start >= self.b_end > 0:
            raise ConfigError(f"AdaRound's exponent anneals down: need b_start >= b_end > 0, got {self.b_start} -> {self.b_end}")

    def beta(self, it: int) -> float:
        """The regulariser exponent at iteration ``it`` (only used after the warm-up)."""
        start = self.warmup * self.iters
        progress = max(0.0, (it - start) / max(1.0, self.iters - start))
        return self.b_end + (self.b_start - self.b_end) * max(0.0, 1.0 - progress)


def lsq_fake_quant(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric fake quantization whose gradient reaches ``scale`` (LSQ): round is a straight-through identity."""
    qmin, qmax = qrange(bits)
    q = x / scale
    q = q + (torch.round(q) - q).detach()
    return q.clamp(qmin, qmax) * scale


class AdaRoundLinear(nn.Module):
    """The training stand-in of one :class:`QuantLinear`: soft-rounded weight, learnable input step size."""

    def __init__(self, layer: QuantLinear):
        super().__init__()
        w = layer.weight.detach()
        self.qmin, self.qmax = qrange(layer.weight_bits)
        self.scale = expand_weight_scale(layer.weight_scale.to(w), w.shape)
        self.floor = torch.floor(w / self.scale)
        rest = w / self.scale - self.floor  # in [0, 1): V starts where h(V) equals it, i.e. W_soft == W
        self.v = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))
        self.bias = layer.bias
        self.act_bits = layer.act_bits
        self.input_scale = self.min_input_scale = None
        if layer.act_bits is not None and layer.input_scale is not None:
            self.input_scale = nn.Parameter(layer.input_scale.detach().clone().to(w).reshape(()))
            self.min_input_scale = min(MIN_ACT_SCALE, float(layer.input_scale))

    def rounding(self) -> torch.Tensor:
        """h(V) in [0, 1]: how far up from ``floor(W / s)`` each weight goes."""
        return (torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)

    def soft_weight(self) -> torch.Tensor:
        return self.scale * (self.floor + self.rounding()).clamp(self.qmin, self.qmax)

    def hard_weight(self) -> torch.Tensor:
        """The on-grid weight ``s * k`` of the learned rounding (h >= 0.5 rounds up)."""
        up = (self.rounding() >= 0.5).to(self.floor)
        return self.scale * (self.floor + up).clamp(self.qmin, self.qmax)

    def regulariser(self, b: float) -> torch.Tensor:
        """``sum(1 - |2h - 1|^b)``: zero once every h is 0 or 1."""
        return (1 - (2 * self.rounding() - 1).abs().pow(b)).sum()

    def keep_scale_positive(self) -> None:
        if self.input_scale is not None:
            with torch.no_grad():
                self.input_scale.clamp_(min=self.min_input_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:
            x = lsq_fake_quant(x, self.input_scale, self.act_bits)
        return F.linear(x, self.soft_weight(), self.bias)


def _check(recipe: Recipe, batches: list[CalibBatch]) -> None:
    if not recipe.symmetric:
        raise ConfigError(
            "reconstruction needs symmetric quantizers (its output must be deployable); calibrate with symmetric scales"
        )
    if recipe.spec.weight_fmt.is_float:
        raise ConfigError(RECONSTRUCT_FLOAT)
    if not batches:
        raise InputError("no calibration batches to reconstruct on; record calibration inputs first")


def _folded_float(float_model: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """The float model with the recipe's folded weights: computes what ``float_model`` computes."""
    folded = copy.deepcopy(float_model).eval()
    folded.load_state_dict({k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})
    return folded.requires_grad_(False)


@torch.no_grad()
def _block_inputs(model: nn.Module, batches: list[CalibBatch], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The first block's inputs on every calibration row: tokens (R, T, D) and conditioning (R, D)."""
    hs, cs = [], []
    for x, t, y in batches:
        x, t, y = x.to(device), t.to(device), y.to(device)
        hs.append(model.x_embedder(x) + model.pos_embed)
        cs.append(model.condition(t, y))
    return torch.cat(hs), torch.cat(cs)


@torch.no_grad()
def _run_block(block: nn.Module, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return torch.cat([block(h[i : i + EVAL_ROWS], c[i : i + EVAL_ROWS]) for i in range(0, len(h), EVAL_ROWS)])


def _mse(out: torch.Tensor, target: torch.Tensor) -> float:
    return float((out - target).square().mean())


def _block_layers(recipe: Recipe, index: int) -> list[str]:
    """The recipe's layers inside block ``index``, as names relative to the block."""
    prefix = f"blocks.{index}."
    return [name[len(prefix) :] for name in recipe.layers if name.startswith(prefix)]


def _train(block: nn.Module, layers: list[AdaRoundLinear], h: torch.Tensor, c: torch.Tensor, target: torch.Tensor,
           settings: ReconstructSettings, gen: torch.Generator) -> None:  # fmt: skip
    """Minimise block output MSE (+ the rounding regulariser after the warm-up) over random row batches."""
    opt_w = torch.optim.Adam([m.v for m in layers], lr=settings.lr_weight)
    act = [m.input_scale for m in layers if m.input_scale is not None]
    opt_a = torch.optim.Adam(act, lr=settings.lr_act) if act else None
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt_a, T_max=settings.iters, eta_min=0.0) if opt_a else None
    warmup = int(settings.warmup * settings.iters)
    rows = min(settings.batch_size, len(h))
    for it in range(settings.iters):
        idx = torch.randperm(len(h), generator=gen)[:rows].to(h.device)
        loss = F.mse_loss(block(h[idx], c[idx]), target[idx])
        if it >= warmup:
            b = settings.beta(it)
            loss = loss + settings.reg_weight * sum(m.regulariser(b) for m in layers)
        for opt in (opt_w, opt_a):
            if opt is not None:
                opt.zero_grad(set_to_none=True)
        loss.backward()
        opt_w.step()
        if opt_a is not None:
            opt_a.step()
            sched.step()
            for m in layers:
                m.keep_scale_positive()


@torch.no_grad()
def _write_back(layer: QuantLinear, learned: AdaRoundLinear, name: str, tensors: dict[str, torch.Tensor]) -> None:
    """Hard rounding into the simulated layer and the recipe tensors (``name``: the layer's full name)."""
    w = learned.hard_weight()
    layer.weight.copy_(w)
    tensors[f"model.{name}.weight"] = w.detach().cpu().clone()
    if learned.input_scale is not None:
        s = learned.input_scale.detach().float().reshape(())
        layer.input_scale = s.clone()
        tensors[f"quant.{name}.input_scale"] = s.cpu().clone()


def _reconstruct_block(block: nn.Module, index: int, names: list[str], h: torch.Tensor, c: torch.Tensor, target: torch.Tensor,
                       settings: ReconstructSettings, gen: torch.Generator, tensors: dict[str, torch.Tensor]) -> None:  # fmt: skip
    """Swap the block's QuantLinears for AdaRound stand-ins, train them, and write the hard result back."""
    originals = {n: block.get_submodule(n) for n in names}
    learned = {n: AdaRoundLinear(q) for n, q in originals.items()}
    for n, m in learned.items():
        set_module(block, n, m)
    try:
        _train(block, list(learned.values()), h, c, target, settings, gen)
    finally:
        for n, q in originals.items():
            set_module(block, n, q)
    for n, q in originals.items():
        _write_back(q, learned[n], f"blocks.{index}.{n}", tensors)


def reconstruct(
    float_model: nn.Module,
    recipe: Recipe,
    tensors: dict[str, torch.Tensor],
    batches: list[CalibBatch],
    settings: ReconstructSettings = ReconstructSettings(),
    *,
    device: str = "cpu",
    progress: bool = False,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Block-by-block reconstruction of a calibrated recipe; returns new tensors and a report.

    ``float_model``: the original float DiT (left untouched); ``recipe``/``tensors``: a symmetric recipe
    from :func:`ditrt.calibrate.ptq.calibrate` (asymmetric ones raise :class:`ConfigError`);
    ``batches``: the calibration inputs ``(x, t, y)``, every row of which is one reconstruction sample.

    Only layers under ``blocks.<i>.`` are reconstructed (with ``quantize_all`` the block's adaLN Linear
    too); embedders and the final layer keep their round-to-nearest weights and calibrated scales, but the
    quantized conditioning path is what the quantized blocks are fed. The returned tensors are a copy of
    ``tensors`` with ``model.<layer>.weight`` on its grid and ``quant.<layer>.input_scale`` learned; the
    weight scales are unchanged. The report: ``{"blocks": [{"block", "mse_before", "mse_after"}, ...],
    "seconds"}``, errors being the block output MSE vs the float block over all calibration rows, with
    round-to-nearest before and the hard learned rounding after.

    Memory: the float and quantized block inputs, the float targets and the quantized outputs of every
    calibration row are cached on ``device`` (4 x rows x tokens x hidden floats: 4.7 MB per row for
    DiT-XL/2 at 256 px, 7.5 GB for 25 x 64 rows; record fewer rows if that does not fit).
    """
    _check(recipe, batches)
    start = time.perf_counter()
    out = dict(tensors)
    fmodel = _folded_float(float_model, tensors).to(device)
    qmodel = quantized_model(float_model, recipe, tensors).requires_grad_(False).to(device)
    h_float, c_float = _block_inputs(fmodel, batches, device)
    h_quant, c_quant = _block_inputs(qmodel, batches, device)
    gen = torch.Generator().manual_seed(settings.seed)
    report = []
    blocks = range(len(qmodel.blocks))
    if progress:
        from tqdm.auto import tqdm

        blocks = tqdm(blocks, desc="reconstructing blocks", unit="block")
    for i in blocks:
        target = _run_block(fmodel.blocks[i], h_float, c_float)
        before = _mse(_run_block(qmodel.blocks[i], h_quant, c_quant), target)
        names = _block_layers(recipe, i)
        if names:
            _reconstruct_block(qmodel.blocks[i], i, names, h_quant, c_quant, target, settings, gen, out)
        h_quant = _run_block(qmodel.blocks[i], h_quant, c_quant)
        after = _mse(h_quant, target)
        h_float = target
        report.append({"block": i, "mse_before": before, "mse_after": after})
        log.info("block %d: output MSE %.4g -> %.4g", i, before, after)
    seconds = time.perf_counter() - start
    return out, {"blocks": report, "seconds": seconds}
