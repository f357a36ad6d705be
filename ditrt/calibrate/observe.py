"""Observe: calibration inputs from the float model's own sampler, and per-layer activation
statistics gathered with forward hooks.

As PTQ4DiT does it: run the float DDPM sampler (cfg 1.5) and record the model inputs
``(x_t, t, y)`` at uniformly spaced steps, each call holding the conditional and the null-class
half. Only what the methods need is kept per layer: the per-channel max |X| at each recorded step
(for balancing) and a bounded random subset of values plus the running max (for scale search),
so memory stays small even for DiT-XL/2.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ditrt.diffusion.recording import Recorder, uniform_indices
from ditrt.diffusion.sampler import SamplerConfig, sample
from ditrt.diffusion.schedule import make_schedule
from ditrt.recipe import CalibrationSettings

CalibBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # x (B, C, H, W), t (B,), y (B,)


def record_calibration_inputs(
    model: nn.Module, settings: CalibrationSettings, *, device: str = "cpu", pixel_space: bool = False, progress: bool = False
) -> list[CalibBatch]:
    """The model inputs at ``settings.timesteps`` uniformly spaced steps of a float sampling run."""
    cfg = model.config
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


@dataclass
class LayerStats:
    """What was seen at the input of one Linear: ``channel_max`` (T, C) per recorded step,
    ``absmax``/``min``/``max`` over everything, and ``samples``, a bounded random subset of values."""

    channel_max: list[torch.Tensor] = field(default_factory=list)
    absmax: float = 0.0
    min: float = float("inf")
    max: float = float("-inf")
    samples: list[torch.Tensor] = field(default_factory=list)

    def channel_max_by_step(self) -> torch.Tensor:
        return torch.stack(self.channel_max)

    def sample_values(self) -> torch.Tensor:
        return torch.cat(self.samples) if self.samples else torch.zeros(1)


def observe_linear_inputs(
    model: nn.Module,
    layers: list[str],
    batches: list[CalibBatch],
    *,
    device: str = "cpu",
    samples_per_batch: int = 4096,
    seed: int = 0,
) -> dict[str, LayerStats]:
    """Run ``batches`` (one per recorded step) through ``model`` and collect :class:`LayerStats`
    for the input of each named Linear."""
    stats = {name: LayerStats() for name in layers}
    gen = torch.Generator().manual_seed(seed)

    def hook_for(name):
        def hook(_module, inputs):
            x = inputs[0].detach().float()
            s = stats[name]
            flat = x.reshape(-1, x.shape[-1])  # (tokens, C)
            s.channel_max.append(flat.abs().amax(0).cpu())
            s.absmax = max(s.absmax, float(flat.abs().max()))
            s.min, s.max = min(s.min, float(flat.min())), max(s.max, float(flat.max()))
            values = flat.reshape(-1).cpu()
            if values.numel() > samples_per_batch:
                values = values[torch.randint(0, values.numel(), (samples_per_batch,), generator=gen)]
            s.samples.append(values)

        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in layers]
    try:
        with torch.no_grad():
            for x, t, y in batches:
                model(x.to(device), t.to(device), y.to(device))
    finally:
        for h in handles:
            h.remove()
    return stats
