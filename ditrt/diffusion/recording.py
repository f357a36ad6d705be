"""Recording the denoiser inputs of a sampling run: calibration data and paired comparisons."""

from __future__ import annotations

import torch


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
