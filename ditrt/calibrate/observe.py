"""Observe: per-layer activation statistics gathered with forward hooks while the calibration
batches (recorded by :func:`ditrt.diffusion.recording.record_calibration_inputs`) run through the
model. Only what the methods need is kept per layer: the per-channel max |X| at each recorded step
(for balancing) and a bounded random subset of values plus the running max (for scale search),
so memory stays small even for DiT-XL/2.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ditrt.diffusion.recording import CalibBatch


@dataclass
class LayerStats:
    """What was seen at the input of one Linear: the per-channel max |X| at each recorded step,
    ``absmax``/``min``/``max`` over everything, and a bounded random subset of values.

    Rows are written into buffers allocated once (``rows`` calls): keeping one small new tensor per
    call alive between the forward pass's large temporaries fragments glibc's heap, which grew a
    CPU calibration of the built-in model to several GB.
    """

    rows: int
    count: int = 0
    absmax: float = 0.0
    min: float = float("inf")
    max: float = float("-inf")
    _channel_max: torch.Tensor | None = None
    _samples: torch.Tensor | None = None
    _sample_counts: list[int] = field(default_factory=list)

    def add(self, flat: torch.Tensor, keep: torch.Tensor | None) -> None:
        """One call's input ``flat`` (tokens, C); ``keep``: indices of the values to sample (all if None)."""
        values = flat.reshape(-1) if keep is None else flat.reshape(-1)[keep]
        if self._channel_max is None:
            self._channel_max = torch.empty(self.rows, flat.shape[-1])
            self._samples = torch.empty(self.rows, values.numel())
        if self.count == self.rows:  # more calls than expected: grow (rare; a module called twice)
            self.rows *= 2
            self._channel_max = torch.cat([self._channel_max, torch.empty_like(self._channel_max)])
            self._samples = torch.cat([self._samples, torch.empty_like(self._samples)])
        torch.amax(flat.abs(), dim=0, out=self._channel_max[self.count])
        n = min(values.numel(), self._samples.shape[1])
        self._samples[self.count, :n] = values[:n]
        self._sample_counts.append(n)
        self.absmax = max(self.absmax, float(flat.abs().max()))
        self.min, self.max = min(self.min, float(flat.min())), max(self.max, float(flat.max()))
        self.count += 1

    def channel_max_by_step(self) -> torch.Tensor:
        """(T, C): per-channel max |X| of each recorded call."""
        return self._channel_max[: self.count] if self._channel_max is not None else torch.zeros(0, 0)

    def sample_values(self) -> torch.Tensor:
        if not self.count:
            return torch.zeros(1)
        return torch.cat([self._samples[i, :n] for i, n in enumerate(self._sample_counts)])


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
    stats = {name: LayerStats(rows=max(1, len(batches))) for name in layers}
    gen = torch.Generator().manual_seed(seed)

    def hook_for(name):
        def hook(_module, inputs):
            flat = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1]).cpu()  # (tokens, C)
            keep = None
            if flat.numel() > samples_per_batch:
                keep = torch.randint(0, flat.numel(), (samples_per_batch,), generator=gen)
            stats[name].add(flat, keep)

        return hook

    run_with_input_hooks(model, {n: hook_for(n) for n in layers}, batches, device=device)
    return stats


def run_with_input_hooks(model: nn.Module, hooks: dict, batches: list[CalibBatch], *, device="cpu") -> None:
    """Run ``batches`` through ``model`` (no grad) with ``hooks[name]`` as a forward pre-hook of each
    named submodule; the hooks are removed afterwards, also on error."""
    handles = [model.get_submodule(n).register_forward_pre_hook(h) for n, h in hooks.items()]
    try:
        with torch.no_grad():
            for x, t, y in batches:
                model(x.to(device), t.to(device), y.to(device))
    finally:
        for h in handles:
            h.remove()


@dataclass(frozen=True)
class LayerInputs:
    """What one Linear saw: sampled token rows ``rows`` (N, C) and ``channel_max`` (C,), the max |x_j|
    over every token of every batch (DiTAS' temporal aggregation)."""

    rows: torch.Tensor
    channel_max: torch.Tensor


class _RowBuffer:
    """Sampled rows and the running channel max of one layer, in buffers allocated once.

    One small tensor kept per call would fragment the heap between the forward pass's temporaries
    (see :class:`LayerStats`); rows are copied into a preallocated (capacity, C) buffer instead.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.filled = 0
        self.rows: torch.Tensor | None = None
        self.channel_max: torch.Tensor | None = None

    def add(self, flat: torch.Tensor, keep: torch.Tensor) -> None:
        """One call's input ``flat`` (tokens, C); ``keep``: indices of the token rows to store."""
        if self.rows is None:
            self.rows = torch.empty(self.capacity, flat.shape[-1])
            self.channel_max = torch.zeros(flat.shape[-1])
        if self.filled + keep.numel() > self.rows.shape[0]:  # more calls than batches (a module called twice): grow
            self.rows = torch.cat([self.rows, torch.empty_like(self.rows)])
        self.rows[self.filled : self.filled + keep.numel()] = flat[keep.to(flat.device)].cpu()
        self.filled += keep.numel()
        torch.maximum(self.channel_max, flat.abs().amax(dim=0).cpu(), out=self.channel_max)

    def result(self) -> LayerInputs:
        if self.rows is None:
            return LayerInputs(torch.zeros(0, 0), torch.zeros(0))
        return LayerInputs(self.rows[: self.filled], self.channel_max)


def capture_layer_inputs(
    model: nn.Module,
    layers: list[str],
    batches: list[CalibBatch],
    *,
    tokens_per_batch: int = 64,
    seed: int = 0,
    device: str = "cpu",
) -> dict[str, LayerInputs]:
    """Run ``batches`` through ``model`` and record, for the input of each named Linear, a random subset
    of ``tokens_per_batch`` token rows per batch (all of them if fewer; full channel vectors, concatenated
    over batches, kept on the CPU) and the per-channel max |x| over all tokens of all batches."""
    buffers = {name: _RowBuffer(max(1, len(batches)) * tokens_per_batch) for name in layers}
    gen = torch.Generator().manual_seed(seed)

    def hook_for(name: str):
        def hook(_module, inputs):
            flat = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])  # (tokens, C)
            keep = torch.randperm(flat.shape[0], generator=gen)[:tokens_per_batch]
            buffers[name].add(flat, keep)

        return hook

    run_with_input_hooks(model, {n: hook_for(n) for n in layers}, batches, device=device)
    return {name: buf.result() for name, buf in buffers.items()}
