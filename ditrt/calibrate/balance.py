"""Channel balancing: PTQ4DiT's CSB and SSC, SmoothQuant, and the offline folds into a DiT block.

Observe -> compute -> apply, split as in ModelOpt's smoothing:
- *observe*: the per-input-channel maxima of each Linear's input (:func:`activation_salience`,
  accumulated by calibration hooks elsewhere) and of its weight (:func:`weight_salience`);
- *compute*: pure tensor functions giving the factors ``d`` (:func:`csb_factors`,
  :func:`smoothquant_factors`, SSC's :func:`ssc_salience`);
- *apply*: fold ``d`` into the float weights so the block computes exactly what it computed before
  (:func:`fold_into_adaln`, :func:`fold_into_v`); nothing is divided at run time, except for the
  layers of :data:`RUNTIME_SMOOTHED` when asked (:func:`smooth_at_run_time`): ``mlp.fc2``, whose
  input is the GELU output, has no linear producer to fold into, so its divisor stays a per-channel
  multiply by ``1 / d`` on the GELU output at run time and only its weight columns absorb ``d``.

Convention throughout: activation channel j is *divided* by ``d_j`` and weight column j is
*multiplied* by ``d_j``, so ``(X / d) (W * d)^T == X W^T``.

Formulas from Wu et al., "PTQ4DiT: Post-training Quantization for Diffusion Transformers"
(NeurIPS 2024): Channel-wise Salience Balancing (CSB), Spearman's rho-guided Salience Calibration
(SSC) and the offline re-parameterization into adaLN and the V projection; and Xiao et al.,
"SmoothQuant" (ICML 2023) for the alpha-migration form. Written from the papers, not their code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ditrt.contracts.errors import ConfigError, InputError
from ditrt.models.quantized import divide_input

#: adaLN output chunks of a DiTBlock, in order.
ADALN_CHUNKS = ("shift_msa", "scale_msa", "gate_msa", "shift_mlp", "scale_mlp", "gate_mlp")
#: branch -> (index of its shift chunk, index of its scale chunk, consumer Linear of the modulated LN output)
BRANCHES = {"msa": (0, 1, "attn.qkv"), "mlp": (3, 4, "mlp.fc1")}


# ----------------------------------------------------------------------------------- observe


def activation_salience(x: torch.Tensor) -> torch.Tensor:
    """PTQ4DiT CSB salience of an activation, ``s(X_j) = max |X_j|``: (..., C) -> (C,)."""
    return x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0)


def weight_salience(w: torch.Tensor) -> torch.Tensor:
    """PTQ4DiT CSB salience of a weight, ``s(W_j) = max_i |W_ij|`` over output rows: (out, in) -> (in,).

    For ``attn.qkv`` pass the whole (3C, C) weight: Q, K and V share one input, hence one vector.
    """
    return w.detach().abs().amax(dim=0)


# ----------------------------------------------------------------------------------- compute


def degenerate_channels(act_salience: torch.Tensor, weight_salience: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Channels (C,) bool where balancing is undefined: a salience <= eps or not finite.

    PTQ4DiT's formula divides by ``s(W_j)`` and has no guard; a dead channel (all-zero weight
    column or activation) would give 0 or inf. Those channels keep ``d_j = 1``.
    """
    if act_salience.shape != weight_salience.shape or act_salience.ndim != 1:
        raise InputError(
            f"activation salience {tuple(act_salience.shape)} and weight salience {tuple(weight_salience.shape)} "
            "must be vectors of the same length (one entry per input channel of the Linear)"
        )
    sx, sw = act_salience.float(), weight_salience.float()
    return ~(torch.isfinite(sx) & torch.isfinite(sw) & (sx > eps) & (sw > eps))


def smoothquant_factors(
    act_salience: torch.Tensor, weight_salience: torch.Tensor, alpha: float = 0.5, eps: float = 1e-8
) -> torch.Tensor:
    """SmoothQuant migration factors ``d_j = s(X_j)^alpha / s(W_j)^(1 - alpha)``: (C,), (C,) -> (C,).

    After ``X / d`` and ``W * d`` both channel maxima equal ``s(X_j)^(1-alpha) s(W_j)^alpha``.
    Degenerate channels (:func:`degenerate_channels`) get 1.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"smoothquant alpha must lie in [0, 1], got {alpha}; 0.5 is PTQ4DiT's balance")
    bad = degenerate_channels(act_salience, weight_salience, eps)
    sx, sw = act_salience.float(), weight_salience.float()
    d = sx.pow(alpha) / sw.pow(1.0 - alpha)
    return torch.where(bad | ~torch.isfinite(d), torch.ones_like(d), d)


def csb_factors(act_salience: torch.Tensor, weight_salience: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """PTQ4DiT CSB balancing factors ``d_j = sqrt(s(X_j) / s(W_j))``: (C,), (C,) -> (C,).

    The balanced salience of both ``X_j / d_j`` and ``W_j * d_j`` is ``sqrt(s(X_j) s(W_j))``
    (SmoothQuant with alpha = 0.5). Degenerate channels get 1.
    """
    bad = degenerate_channels(act_salience, weight_salience, eps)
    d = (act_salience.float() / weight_salience.float()).sqrt()
    return torch.where(bad | ~torch.isfinite(d), torch.ones_like(d), d)


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks of a vector (n,), ties sharing the mean of their ranks (float64)."""
    values, order = torch.sort(x.double(), stable=True)
    _, inverse, counts = torch.unique_consecutive(values, return_inverse=True, return_counts=True)
    last = counts.cumsum(0).double()  # 1-based rank of each run's last element
    mean_rank = last - (counts.double() - 1) / 2
    ranks = torch.empty_like(values)
    ranks[order] = mean_rank[inverse]
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two vectors (n,): Pearson's r of their average ranks.

    A constant vector has no ranking: returns 0.0 (uncorrelated) instead of NaN.
    """
    a, b = torch.as_tensor(a).reshape(-1), torch.as_tensor(b).reshape(-1)
    if a.shape != b.shape or a.numel() < 2:
        raise InputError(f"spearman needs two vectors of equal length >= 2, got {tuple(a.shape)} and {tuple(b.shape)}")
    ra, rb = _average_ranks(a), _average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.square().sum() * rb.square().sum()).sqrt()
    if denom == 0:
        return 0.0
    return float((ra * rb).sum() / denom)


def ssc_salience(act_saliences: torch.Tensor, w_salience: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PTQ4DiT SSC: one activation salience over all calibration timesteps.

    ``act_saliences`` (T, C): ``s(X^t)`` per timestep; ``w_salience`` (C,): ``s(W)``.
    ``rho_t = spearman(s(X^t), s(W))``, ``eta = softmax(-rho)`` (temperature 1: timesteps whose
    activation salience is *less* aligned with the weight's, i.e. where balancing matters most,
    weigh more), ``s_rho = sum_t eta_t s(X^t)``. Returns ``(s_rho (C,), eta (T,), rho (T,))``.
    """
    if act_saliences.ndim != 2 or act_saliences.shape[1] != w_salience.shape[-1]:
        raise InputError(
            f"SSC needs activation saliences (T, C) and a weight salience (C,), got {tuple(act_saliences.shape)} "
            f"and {tuple(w_salience.shape)}"
        )
    w_salience = w_salience.to(act_saliences.device)
    rho = torch.tensor([spearman(s, w_salience) for s in act_saliences], dtype=torch.float64)  # (T,) on the CPU
    eta = torch.softmax(-rho, dim=0)
    s_rho = (eta.to(act_saliences)[:, None] * act_saliences).sum(dim=0)
    return s_rho, eta, rho


@dataclass(frozen=True)
class BalanceReport:
    """What balancing one Linear did: how many channels, how many kept d = 1, the factor range."""

    layer: str
    channels: int
    skipped: int
    d_min: float
    d_max: float

    @classmethod
    def of(cls, layer: str, d: torch.Tensor, act_salience: torch.Tensor, weight_salience: torch.Tensor, eps: float = 1e-8):
        skipped = int(degenerate_channels(act_salience, weight_salience, eps).sum())
        return cls(layer, d.numel(), skipped, float(d.min()), float(d.max()))


# ----------------------------------------------------------------------------------- apply


def _check_factors(d: torch.Tensor, channels: int) -> torch.Tensor:
    if d.shape != (channels,):
        raise InputError(f"balancing factors must have shape ({channels},), got {tuple(d.shape)}")
    if not bool((torch.isfinite(d) & (d > 0)).all()):
        raise InputError("balancing factors must be finite and positive; compute them with csb_factors/smoothquant_factors")
    return d


@torch.no_grad()
def scale_input_columns(linear: nn.Linear, d: torch.Tensor) -> None:
    """``W[:, j] *= d_j``: the consumer side of a fold (its input channel j arrives divided by d_j)."""
    d = _check_factors(d, linear.in_features)
    linear.weight.mul_(d.to(linear.weight)[None, :])


@torch.no_grad()
def fold_into_adaln(block: nn.Module, branch: str, d: torch.Tensor) -> nn.Module:
    """Divide the modulated LN output of ``branch`` ("msa": input of attn.qkv, "mlp": of mlp.fc1) by d.

    PTQ4DiT's offline re-parameterization. With ``modulate(x) = x (1 + scale) + shift`` and
    ``shift = W_sh c + b_sh``, ``scale = W_sc c + b_sc`` (rows of ``adaLN_modulation[1]``):
    ``W_sh /= d, b_sh /= d, W_sc /= d, b_sc = (1 + b_sc) / d - 1`` make the modulated output
    ``x (1 + scale) / d + shift / d``; gates are untouched; then the consumer's ``W[:, j] *= d_j``.
    The block output is unchanged up to float rounding. ``d``: (C,). Modifies ``block`` in place.
    """
    if branch not in BRANCHES:
        raise ConfigError(f"unknown branch {branch!r}; choose 'msa' (attention input) or 'mlp' (MLP input)")
    sh, sc, consumer = BRANCHES[branch]
    ada = block.adaLN_modulation[1]
    if ada.bias is None:  # without a bias the "1 +" of modulate cannot be absorbed
        raise InputError("adaLN_modulation[1] has no bias; the scale fold needs one (the DiT layout always has it)")
    c = ada.out_features // len(ADALN_CHUNKS)
    d = _check_factors(d, c).to(ada.weight)
    rows_sh, rows_sc = slice(sh * c, (sh + 1) * c), slice(sc * c, (sc + 1) * c)
    ada.weight[rows_sh] /= d[:, None]
    ada.weight[rows_sc] /= d[:, None]
    ada.bias[rows_sh] /= d
    ada.bias[rows_sc] = (1 + ada.bias[rows_sc]) / d - 1
    scale_input_columns(block.get_submodule(consumer), d)
    return block


@torch.no_grad()
def fold_into_v(block: nn.Module, d: torch.Tensor) -> nn.Module:
    """Divide attn.proj's input channel j (head h, dim k, j = h * head_dim + k) by d_j via the V rows.

    The attention output is ``softmax(QK^T) V`` per head, linear in V, so ``qkv.weight[2C + j] /= d_j``
    and ``qkv.bias[2C + j] /= d_j`` divide output channel j; ``proj.weight[:, j] *= d_j`` restores it
    (PTQ4DiT's re-parameterization for the projection). ``d``: (C,). Modifies ``block`` in place.
    Any quantizer that sees V (the qkv output) must be calibrated after this fold.
    """
    qkv, proj = block.attn.qkv, block.attn.proj
    c = proj.in_features
    d = _check_factors(d, c).to(qkv.weight)
    qkv.weight[2 * c : 3 * c] /= d[:, None]
    if qkv.bias is not None:
        qkv.bias[2 * c : 3 * c] /= d
    scale_input_columns(proj, d)
    return block


#: balanced Linear of a DiT block -> where its divisor is folded (PTQ4DiT sec. 4.3): the adaLN rows of the
#: "msa" or "mlp" branch, or the V rows of qkv ("v")
BALANCED = {"attn.qkv": "msa", "mlp.fc1": "mlp", "attn.proj": "v"}


def apply_balance(model: nn.Module, factors: dict[str, torch.Tensor]) -> None:
    """Apply: fold every divisor ``{"blocks.<i>.<layer>": d (C,)}`` into the weights (exact in float)."""
    for name, d in factors.items():
        i, layer = int(name.split(".")[1]), name.split(".", 2)[2]
        block = model.blocks[i]
        if BALANCED[layer] == "v":
            fold_into_v(block, d)
        else:
            fold_into_adaln(block, BALANCED[layer], d)


#: Linears of a DiT block that can only be smoothed at run time: fc2's input is GELU(fc1(.)), and the GELU
#: between them means no weight upstream can absorb a per-channel divisor.
RUNTIME_SMOOTHED = ("mlp.fc2",)


def runtime_smoothable(layers) -> list[str]:
    """The block Linears among ``layers`` that :func:`smooth_at_run_time` can smooth (every ``blocks.<i>.mlp.fc2``)."""
    return [n for n in layers if n.startswith("blocks.") and n.split(".", 2)[-1] in RUNTIME_SMOOTHED]


def smooth_at_run_time(model: nn.Module, divisors: dict[str, torch.Tensor]) -> None:
    """Apply run-time smoothing ``{"blocks.<i>.mlp.fc2": d (C,)}``: ``W[:, j] *= d_j`` in the weights, and a
    forward pre-hook (:func:`ditrt.models.quantized.divide_input`) that multiplies the layer's input by
    ``1 / d``, the same float32 reciprocal the simulation and the exported Mul use. Every later pass over
    ``model`` (observation, scale searches, GPTQ) then sees the smoothed input ``x / d``, and the model
    computes what it computed before up to float rounding. The divisor is *not* part of the state dict:
    a recipe records it as ``quant.<layer>.input_divisor``."""
    for name, d in divisors.items():
        linear = model.get_submodule(name)
        scale_input_columns(linear, d)
        divide_input(linear, d)
