"""Recording the denoiser inputs of a sampling run: calibration data and paired comparisons.

As PTQ4DiT does it: run the float DDPM sampler (cfg 1.5) and record the model inputs
``(x_t, t, y)`` at uniformly spaced steps, each call holding the conditional and the null-class half.
"""

from __future__ import annotations

import torch
from torch import nn

from ditrt.contracts.recipe import CalibrationSettings
from ditrt.diffusion.sampler import SamplerConfig, sample
from ditrt.diffusion.schedule import make_schedule

CalibBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # x (B, C, H, W), t (B,), y (B,)


class Recorder:
    """Wraps a denoiser; keeps ``(x, t, y)`` (CPU copies) of the calls whose index is in ``keep``.

    Calls are counted from 0 in sampling order (the first call is the noisiest step); with
    classifier-free guidance each call holds the conditional and the null-class half.
    ``keep=None`` keeps every call.
    """

    def __init__(self, denoiser, keep: set[int] | None = None):
        self.denoiser = denoiser
        self.keep = keep
        self.calls = 0
        self.records: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.keep is None or self.calls in self.keep:
            self.records.append((x.detach().cpu().clone(), t.detach().cpu().clone(), y.detach().cpu().clone()))
        self.calls += 1
        return self.denoiser(x, t, y)


def uniform_indices(num_steps: int, count: int) -> set[int]:
    """``count`` call indices spread uniformly over ``num_steps`` (first and last included)."""
    if count >= num_steps:
        return set(range(num_steps))
    if count == 1:
        return {num_steps // 2}
    return {round(i * (num_steps - 1) / (count - 1)) for i in range(count)}


def record_calibration_inputs(
    model: nn.Module, settings: CalibrationSettings, *, device: str = "cpu", pixel_space: bool = False, progress: bool = False
) -> list[CalibBatch]:
    """The model inputs at ``settings.timesteps`` uniformly spaced steps of a float sampling run."""
    cfg = model.config
    cfg.check_guidance(settings.cfg_scale, "the model")
    schedule = make_schedule(settings.steps)
    recorder = Recorder(model, keep=uniform_indices(schedule.num_steps, settings.timesteps))
    g = torch.Generator().manual_seed(settings.seed)
    labels = torch.randint(0, cfg.num_classes, (settings.samples,), generator=g).tolist()
    seeds = [settings.seed * 100_003 + i for i in range(settings.samples)]
    sampler = SamplerConfig(steps=settings.steps, cfg_scale=settings.cfg_scale, clip_denoised=pixel_space)
    with torch.no_grad():
        sample(
            recorder, sampler, labels, seeds, num_classes=cfg.num_classes,
            image_shape=(cfg.in_channels, cfg.input_size, cfg.input_size), device=device, progress=progress,
        )  # fmt: skip
    return recorder.records
