"""The backend-agnostic sampling loop: DDPM ancestral steps (or DDIM for "ddimN") with
classifier-free guidance, around any :class:`Denoiser`.

The denoiser is only ever called as ``denoiser(x, t, y)`` with torch tensors on ``device``:
``x`` (B, C, H, W), ``t`` (B,) float timesteps of the 1000-step training schedule, ``y`` (B,)
int64 labels where ``num_classes`` is the null class; it must return its output on that device
too (the rule of :mod:`ditrt.runtime.open`). With guidance the batch is doubled (conditional half
first, null-class half second) into one call, as the official DiT code does.

Noise comes from one CPU ``torch.Generator`` per sample seeded with that sample's seed, so a sample
depends only on (seed, label, settings), whatever device it is sampled on: two models sampled with
the same seeds are paired, on the CPU and on a GPU alike (a CUDA generator would draw other numbers).

Between denoiser calls everything stays on ``device``, and on a GPU the host never waits for it
inside the loop: the schedule's coefficients are moved there once per run, each step's noise is
drawn on the host when that step needs it (while the GPU still works on earlier steps) and copied
from pinned memory without blocking, and the NaN/inf check of the model output is kept on the
device and read every :data:`FINITE_CHECK_EVERY` steps and at the end (on the CPU: every step).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

import torch

from ditrt.contracts.errors import ConfigError, InputError
from ditrt.diffusion.schedule import Schedule, make_schedule


class Denoiser(Protocol):
    """``(x, t, y) -> output``. A denoiser that dispatches on the timestep (one engine per timestep
    group) may also offer ``at_timestep(t: float) -> Denoiser``: the sampler, which knows each step's
    timestep on the host, then calls that one and the denoiser never reads ``t`` back from the device."""

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


#: on a GPU, how many steps run between two reads of the on-device NaN/inf flag (each read waits for the GPU)
FINITE_CHECK_EVERY = 25


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...], *, device, dtype=torch.float32) -> tuple[torch.Tensor, list]:
    """x_T for each seed (on ``device``) and the per-sample CPU generators that continue its noise stream."""
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    return _draw(gens, shape, device, dtype), gens


def _draw(gens: list, shape: tuple[int, ...], device, dtype=torch.float32) -> torch.Tensor:
    """One draw of ``shape`` from each generator, stacked (N, *shape), on ``device``."""
    return to_device(torch.stack([torch.randn(shape, generator=g, dtype=dtype) for g in gens]), device)


def to_device(x: torch.Tensor, device) -> torch.Tensor:
    """``x`` on ``device``; a CPU tensor goes to a GPU from pinned memory without making the host wait."""
    device = torch.device(device)
    if device.type != "cuda" or x.device.type != "cpu":
        return x.to(device)
    return (x if x.is_pinned() else x.pin_memory()).to(device, non_blocking=True)


def on_device(schedule: Schedule, device) -> Schedule:
    """A copy of ``schedule`` whose tensors live on ``device`` (the same object on the CPU), so that
    no step copies a coefficient from the host."""
    device = torch.device(device)
    if device.type == "cpu":
        return schedule
    moved = copy.copy(schedule)
    for name, value in vars(schedule).items():
        if isinstance(value, torch.Tensor):
            setattr(moved, name, value.to(device))
    return moved


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

    A step whose model output holds NaN or inf stops the run (:class:`NonFiniteOutputError`, naming the
    step): on the CPU at that step, elsewhere within :data:`FINITE_CHECK_EVERY` steps (see the module doc).
    ``device`` is where the loop runs: the denoiser's inputs are there and its output must be too.
    """
    labels = torch.as_tensor(labels, dtype=torch.int64)
    if labels.ndim != 1 or len(labels) != len(seeds) or len(labels) == 0:
        raise InputError(f"need one seed per label, got {len(labels)} labels and {len(seeds)} seeds")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if len(bad):
        raise InputError(f"class id {int(bad[0])} is out of range: this model has classes 0..{num_classes - 1}")
    host_schedule = make_schedule(config.steps)
    device = torch.device(device)
    schedule = on_device(host_schedule, device)
    y = to_device(labels, device)
    x, gens = initial_noise(seeds, image_shape, device=device)
    shape = (len(labels), *image_shape)
    if noise is not None:
        x = _given(noise, shape, "noise", device)
    draw = _step_noise(step_noise, shape, schedule.num_steps, device, gens)
    finite = _FiniteCheck(host_schedule, device)
    pick = getattr(denoiser, "at_timestep", None)
    host_t = host_schedule.timestep_map.tolist()
    ddim = schedule.spacing.startswith("ddim")
    steps = range(schedule.num_steps - 1, -1, -1)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=f"sampling {len(seeds)} x {schedule.num_steps} steps", unit="step", leave=False)
    with torch.no_grad():
        for n_done, i in enumerate(steps):
            net = denoiser if pick is None else pick(float(host_t[i]))
            x = _step(net, schedule, x, i, y, draw, config, num_classes, ddim, n_done, finite)
            if on_step is not None:
                on_step(n_done + 1, schedule.num_steps)
    finite.done()
    return x


class NonFiniteOutputError(InputError):
    """The denoiser returned NaN or inf: broken weights, an overflowing float16 engine, a bad quantization."""


class _FiniteCheck:
    """Stops a run whose model output holds NaN or inf, naming the first such step.

    ``every=1`` (the default on the CPU) checks each step as it comes. Elsewhere reading a flag back
    would make the host wait for the device at every step, so the index of the first bad step is
    kept on the device and read every ``every`` steps (:data:`FINITE_CHECK_EVERY`) and at the end; a
    meta tensor holds no values and is never read."""

    def __init__(self, schedule: Schedule, device: torch.device, every: int | None = None):
        self.schedule, self.readable = schedule, device.type != "meta"
        self.every = every if every is not None else (1 if device.type == "cpu" else FINITE_CHECK_EVERY)
        self.first_bad = None if self.every == 1 else torch.full((), -1, dtype=torch.int64, device=device)

    def __call__(self, out: torch.Tensor, k: int) -> None:
        if self.every == 1:
            if not bool(torch.isfinite(out).all()):
                self._fail(k)
            return
        bad = (self.first_bad < 0) & ~torch.isfinite(out).all()
        self.first_bad = torch.where(bad, k, self.first_bad)
        if (k + 1) % self.every == 0:
            self.done()

    def done(self) -> None:
        if self.first_bad is not None and self.readable and int(self.first_bad) >= 0:
            self._fail(int(self.first_bad))

    def _fail(self, k: int):
        s = self.schedule
        t = float(s.timestep_map[s.num_steps - 1 - k])
        raise NonFiniteOutputError(
            f"the denoiser returned NaN/inf at step {k + 1} of {s.num_steps} (t={t:g}): check the model's weights "
            "(`ditrt check` on a graph), and for a float16 graph or engine try float32"
        )


def _given(value, shape: tuple[int, ...], name: str, device) -> torch.Tensor:
    value = torch.as_tensor(value)
    if tuple(value.shape) != tuple(shape):
        raise InputError(f"{name} must have shape {tuple(shape)} (one per sample), got {tuple(value.shape)}")
    return to_device(value.to(dtype=torch.float32), device)


def _step_noise(step_noise, shape, num_steps: int, device, gens) -> Callable[[int], torch.Tensor]:
    """``k -> (N, C, H, W)``: the noise added at sampling step k (0 = the first, noisiest step), on ``device``."""
    if step_noise is None:
        return lambda k: _draw(gens, shape[1:], device)
    if callable(step_noise):
        return lambda k: _given(step_noise(k), shape, f"step_noise({k})", device)
    step_noise = torch.as_tensor(step_noise)
    if step_noise.ndim != 5 or step_noise.shape[0] not in (num_steps - 1, num_steps) or tuple(step_noise.shape[1:]) != tuple(shape):
        raise InputError(
            f"step_noise must have shape ({num_steps - 1} or {num_steps}, {', '.join(map(str, shape))}) for {num_steps} steps, "
            f"got {tuple(step_noise.shape)}"
        )
    step_noise = step_noise.to(dtype=torch.float32)
    if torch.device(device).type == "cuda" and step_noise.device.type == "cpu":
        step_noise = step_noise.pin_memory()  # pinned once, so each step's slice is copied without blocking the host
    return lambda k: to_device(step_noise[k], device)


def _step(denoiser, schedule: Schedule, x, i: int, y, draw, config: SamplerConfig, num_classes: int, ddim: bool, k: int, finite):
    n = x.shape[0]
    idx = torch.full((n,), i, dtype=torch.int64, device=x.device)
    t = schedule.timestep_map[idx].to(x.dtype)  # the training timestep the model knows
    out = guided_output(denoiser, x, t, y, null_class=num_classes, cfg_scale=config.cfg_scale, guidance=config.guidance)
    finite(out, k)  # stop there: NaN would otherwise flow silently into every later step
    mean, log_var, x0 = schedule.p_mean_variance(out.to(x.dtype), x, idx, clip_denoised=config.clip_denoised)
    if i == 0:  # the last step returns the mean (no noise), as the reference loops do
        return x0 if ddim else mean
    noise = draw(k)  # drawn under DDIM too, so that the seeded streams stay aligned
    if ddim:  # eta = 0: deterministic, the noise stream is still advanced to keep seeds aligned
        eps = schedule.predict_eps(x, idx, x0)
        acp_prev = schedule._at(schedule.alphas_cumprod_prev, idx, x)
        return x0 * acp_prev.sqrt() + (1 - acp_prev).sqrt() * eps
    return mean + torch.exp(0.5 * log_var) * noise
