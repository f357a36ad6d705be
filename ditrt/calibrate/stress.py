"""Stress variants: a DiT with injected salient input channels, computing exactly the same function.

Small or briefly trained DiTs lack the extreme activation channels that make DiT-XL/2 hard to
quantize (PTQ4DiT's "salient channels"). :func:`inject_salient_channels` creates them without
changing what the model computes: it multiplies a few channels of the modulated LayerNorm output
(the input of ``attn.qkv`` and ``mlp.fc1``) by factors ``f_j`` through the adaLN shift/scale rows
and divides the matching weight columns by ``f_j``. That is :func:`~ditrt.calibrate.balance.fold_into_adaln`
with ``d = 1 / f``: the inverse of balancing. Naive per-tensor activation quantization then suffers as
it does on the large models, and balancing has something to undo.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ditrt.calibrate.balance import BRANCHES, activation_salience, fold_into_adaln
from ditrt.contracts.errors import ConfigError, InputError

#: Factors are capped so that a near-dead channel does not get an absurd multiplier.
MAX_FACTOR = 1e4
#: Gaussian-noise inputs used to measure channel magnitudes when none are given.
PROBE_BATCH = 8


def branch_layer(block_index: int, branch: str) -> str:
    """The consumer Linear of a block's branch: ``blocks.{i}.attn.qkv`` or ``blocks.{i}.mlp.fc1``."""
    return f"blocks.{block_index}.{BRANCHES[branch][2]}"


def random_inputs(
    config, *, batch: int = PROBE_BATCH, seed: int = 0, device=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Data-free probe inputs: Gaussian x (N, C, H, W), timesteps spread over [0, 999] (N,), random labels (N,)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, config.input_size, config.input_size, generator=g)
    t = torch.linspace(0, 999, batch).round()
    y = torch.randint(0, config.num_classes, (batch,), generator=g)
    return x.to(device), t.to(device), y.to(device)


@torch.no_grad()
def input_salience(model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-channel max |input| (C,) of every ``attn.qkv`` and ``mlp.fc1`` for one forward of ``model``."""
    out: dict[str, torch.Tensor] = {}
    hooks = []
    for i, block in enumerate(model.blocks):
        for branch in BRANCHES:
            name = branch_layer(i, branch)

            def record(_mod, args, name=name):
                out[name] = activation_salience(args[0]).float().cpu()

            hooks.append(block.get_submodule(BRANCHES[branch][2]).register_forward_pre_hook(record))
    was_training = model.training
    try:
        model.eval()
        model(x, t, y)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return out


def _upper_median_without(s: torch.Tensor, chosen: torch.Tensor) -> float:
    """The median channel salience *after* the chosen channels become the largest ones.

    Setting the chosen entries to +inf and taking the upper median gives exactly the post-injection
    median (for any median convention it is an upper bound), so targets relative to it hold afterwards.
    """
    masked = s.clone()
    masked[chosen] = float("inf")
    return float(masked.sort().values[s.numel() // 2])


def _check_options(fraction: float, magnitude: tuple[float, float], channels: int) -> int:
    lo, hi = magnitude
    if not 0 < lo <= hi:
        raise ConfigError(f"magnitude must be a range (low, high) with 0 < low <= high, got {magnitude}")
    k = max(1, round(fraction * channels))
    if not 0 < fraction or k > (channels - 1) // 2:
        raise ConfigError(f"fraction {fraction} of {channels} channels is not a minority; use a small fraction such as 0.03")
    return k


def inject_salient_channels(
    model: nn.Module,
    *,
    fraction: float = 0.03,
    magnitude: tuple[float, float] = (10.0, 100.0),
    seed: int = 0,
    act_salience: dict[str, torch.Tensor] | None = None,
) -> dict:
    """Make ``model`` (a DiT, modified in place) a stress variant with salient qkv/fc1 input channels.

    For each block and branch, ``round(fraction * C)`` channels (at least 1) are drawn with a seeded
    generator; each gets a target magnitude ``r_j * median(s)`` with ``r_j`` log-uniform in
    ``magnitude`` and ``s`` the per-channel max |input| of that layer, and the factor
    ``f_j = target / s_j`` (clamped to [1, :data:`MAX_FACTOR`]). ``act_salience`` maps
    ``blocks.{i}.attn.qkv`` / ``blocks.{i}.mlp.fc1`` to ``s`` (C,); when None it is measured on
    :func:`random_inputs` (Gaussian noise, seed ``seed``), which needs no data.
    Returns a JSON-ready description: options and, per layer, channels, factors and target ratios.
    """
    hidden = model.config.hidden_size
    k = _check_options(fraction, magnitude, hidden)
    source = "given"
    if act_salience is None:
        act_salience = input_salience(model, *random_inputs(model.config, seed=seed, device=model.pos_embed.device))
        source = f"measured on {PROBE_BATCH} gaussian-noise probe inputs (seed {seed})"
    gen = torch.Generator().manual_seed(seed)
    log_lo, log_hi = math.log(magnitude[0]), math.log(magnitude[1])
    layers = {}
    for i, block in enumerate(model.blocks):
        for branch in BRANCHES:
            name = branch_layer(i, branch)
            if name not in act_salience:
                raise InputError(f"act_salience has no entry {name!r}; pass one (C,) vector per qkv/fc1 input, or None")
            s = act_salience[name].detach().float().cpu().reshape(-1)
            chosen = torch.randperm(hidden, generator=gen)[:k].sort().values
            ratio = torch.exp(log_lo + torch.rand(k, generator=gen, dtype=torch.float64) * (log_hi - log_lo)).float()
            target = ratio * _upper_median_without(s, chosen)
            f = torch.where(s[chosen] > 0, target / s[chosen], ratio).clamp(1.0, MAX_FACTOR)
            d = torch.ones(hidden)
            d[chosen] = 1.0 / f
            fold_into_adaln(block, branch, d)
            layers[name] = {"channels": chosen.tolist(), "factors": f.tolist(), "target_ratio": ratio.tolist()}
    return {"fraction": fraction, "magnitude": list(magnitude), "seed": seed, "salience": source, "layers": layers}
