"""The backend-agnostic sampling loop: DDPM ancestral steps (or DDIM for "ddimN") with
classifier-free guidance, around any :class:`Denoiser`.

The denoiser is only ever called as ``denoiser(x, t, y)`` with torch tensors on ``device``:
``x`` (B, C, H, W), ``t`` (B,) float timesteps of the 1000-step training schedule, ``y`` (B,)
int64 labels where ``num_classes`` is the null class. With guidance the batch is doubled
(conditional half first, null-class half second) into one call, as the official DiT code does.

Noise comes from one ``torch.Generator`` per sample seeded with that sample's seed, so a sample
depends only on (seed, label, settings): two models sampled with the same seeds are paired.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

import torch

from ditrt.contracts.errors import ConfigError, InputError
from ditrt.diffusion.schedule import Schedule, make_schedule


class Denoiser(Protocol):
    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W), (B,), (B,) -> (B, 2C, H, W): noise prediction and variance interpolation."""


@dataclass(frozen=True)
class SamplerConfig:
    """How to sample. ``guidance="official"`` guides the first min(3, C) noise channels only, as the
    official DiT code does (needed to reproduce its FIDs); ``"all"`` guides every noise channel."""

    steps: str = "250"  # respacing: "250", "100", "50", "ddim50", ...
    cfg_scale: float = 1.5
    guidance: str = "official"
    clip_denoised: bool = False  # clamp predicted x0 to [-1, 1] (pixel-space models)

    def __post_init__(self):
        if self.guidance not in ("official", "all"):
            raise ConfigError(f"guidance must be 'official' or 'all', not {self.guidance!r}")
        if not self.cfg_scale >= 1.0:
            raise ConfigError(f"cfg scale must be >= 1.0 (1.0 disables guidance), got {self.cfg_scale}")
        make_schedule(self.steps)  # validates the step string early

    def to_dict(self) -> dict:
        return asdict(self)


def guided_output(
    denoiser: Denoiser, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *, null_class: int, cfg_scale: float, guidance: str
) -> torch.Tensor:
    """One (possibly guided) model evaluation: (N, C, H, W) -> (N, 2C, H, W)."""
    if cfg_scale == 1.0:
        return denoiser(x, t, y)
    n, c = x.shape[0], x.shape[1]
    out = denoiser(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_class)]))
    cond, uncond = out[:n], out[n:]
    # The official code guides channels [:3] of the output; capped at C so that a model with fewer
    # than 3 noise channels never has its variance channel extrapolated.
    k = min(3, c) if guidance == "official" else c
    eps = uncond[:, :k] + cfg_scale * (cond[:, :k] - uncond[:, :k])
    return torch.cat([eps, cond[:, k:]], dim=1)


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...], *, device, dtype=torch.float32) -> tuple[torch.Tensor, list]:
    """x_T for each seed and the per-sample generators that continue its noise stream."""
    gens = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
    x = torch.stack([torch.randn(shape, generator=g, device=device, dtype=dtype) for g in gens])
    return x, gens


def sample(
    denoiser: Denoiser,
    config: SamplerConfig,
    labels: Sequence[int] | torch.Tensor,
    seeds: Sequence[int],
    *,
    num_classes: int,
    image_shape: tuple[int, int, int],
    device: str | torch.device = "cpu",
    progress: bool = False,
    on_step: Callable[[int, int], None] | None = None,
    noise: torch.Tensor | None = None,
    step_noise: torch.Tensor | Callable[[int], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Draw one sample per (label, seed): returns (N, C, H, W) in the model's data range.

    By default sample i's noise comes from its own generator seeded with ``seeds[i]``. To reproduce
    another implementation's run, pass its noise: ``noise`` the initial x_T (N, C, H, W), and
    ``step_noise`` the noise added at each step, in sampling order (step 0 is the noisiest): a tensor
    (S, N, C, H, W) with S = steps - 1 (the last step adds none) or S = steps (the official loop draws
    one for the last step too and multiplies it by zero), or a callable ``k -> (N, C, H, W)``. Without
    ``step_noise`` the seeded generators supply it, having drawn (and discarded) their x_T first, so
    ``noise`` equal to the seeded x_T gives the seeded result bit for bit. DDIM (eta 0) adds no noise.

    A step whose model output holds NaN or inf stops the run (:class:`NonFiniteOutputError`, naming the step).
    """
    labels = torch.as_tensor(labels, dtype=torch.int64)
    if labels.ndim != 1 or len(labels) != len(seeds) or len(labels) == 0:
        raise InputError(f"need one seed per label, got {len(labels)} labels and {len(seeds)} seeds")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if len(bad):
        raise InputError(f"class id {int(bad[0])} is out of range: this model has classes 0..{num_classes - 1}")
    schedule = make_schedule(config.steps)
    device = torch.device(device)
    y = labels.to(device)
    x, gens = initial_noise(seeds, image_shape, device=device)
    shape = (len(labels), *image_shape)
    if noise is not None:
        x = _given(noise, shape, "noise", device)
    draw = _step_noise(step_noise, shape, schedule.num_steps, device, gens)
    ddim = schedule.spacing.startswith("ddim")
    steps = range(schedule.num_steps - 1, -1, -1)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=f"sampling {len(seeds)} x {schedule.num_steps} steps", unit="step", leave=False)
    with torch.no_grad():
        for n_done, i in enumerate(steps):
            x = _step(denoiser, schedule, x, i, y, draw, config, num_classes, ddim, n_done)
            if on_step is not None:
                on_step(n_done + 1, schedule.num_steps)
    return x


class NonFiniteOutputError(InputError):
    """The denoiser returned NaN or inf: broken weights, an overflowing float16 engine, a bad quantization."""


def _given(value, shape: tuple[int, ...], name: str, device) -> torch.Tensor:
    value = torch.as_tensor(value)
    if tuple(value.shape) != tuple(shape):
        raise InputError(f"{name} must have shape {tuple(shape)} (one per sample), got {tuple(value.shape)}")
    return value.to(device=device, dtype=torch.float32)


def _step_noise(step_noise, shape, num_steps: int, device, gens) -> Callable[[int], torch.Tensor]:
    """``k -> (N, C, H, W)``: the noise added at sampling step k (0 = the first, noisiest step)."""
    if step_noise is None:
        return lambda k: torch.stack([torch.randn(shape[1:], generator=g, device=device, dtype=torch.float32) for g in gens])
    if callable(step_noise):
        return lambda k: _given(step_noise(k), shape, f"step_noise({k})", device)
    step_noise = torch.as_tensor(step_noise)
    if step_noise.ndim != 5 or step_noise.shape[0] not in (num_steps - 1, num_steps) or tuple(step_noise.shape[1:]) != tuple(shape):
        raise InputError(
            f"step_noise must have shape ({num_steps - 1} or {num_steps}, {', '.join(map(str, shape))}) for {num_steps} steps, "
            f"got {tuple(step_noise.shape)}"
        )
    return lambda k: step_noise[k].to(device=device, dtype=torch.float32)


def _step(denoiser, schedule: Schedule, x, i: int, y, draw, config: SamplerConfig, num_classes: int, ddim: bool, k: int):
    n = x.shape[0]
    idx = torch.full((n,), i, dtype=torch.int64, device=x.device)
    t = schedule.timestep_map.to(x.device)[idx].to(x.dtype)  # the training timestep the model knows
    out = guided_output(denoiser, x, t, y, null_class=num_classes, cfg_scale=config.cfg_scale, guidance=config.guidance)
    if not bool(torch.isfinite(out).all()):  # stop here: NaN would otherwise flow silently into every later step
        raise NonFiniteOutputError(
            f"the denoiser returned NaN/inf at step {k + 1} of {schedule.num_steps} (t={float(t[0]):g}): check the model's weights "
            "(`ditrt check` on a graph), and for a float16 graph or engine try float32"
        )
    mean, log_var, x0 = schedule.p_mean_variance(out.to(x.dtype), x, idx, clip_denoised=config.clip_denoised)
    if i == 0:  # the last step returns the mean (no noise), as the reference loops do
        return x0 if ddim else mean
    noise = draw(k)  # drawn under DDIM too, so that the seeded streams stay aligned
    if ddim:  # eta = 0: deterministic, the noise stream is still advanced to keep seeds aligned
        eps = schedule.predict_eps(x, idx, x0)
        acp_prev = schedule._at(schedule.alphas_cumprod_prev, idx, x)
        return x0 * acp_prev.sqrt() + (1 - acp_prev).sqrt() * eps
    return mean + torch.exp(0.5 * log_var) * noise
