"""Observe: per-layer activation statistics gathered with forward hooks while the calibration
batches (recorded by :func:`ditrt.diffusion.recording.record_calibration_inputs`) run through the
model. Only what the methods need is kept per layer: the per-channel max |X| at each recorded step
(for balancing) and a bounded random subset of values plus the running max (for scale search),
so memory stays small even for DiT-XL/2.

Every recorded batch runs in fixed slices of :data:`OBSERVE_ROWS` rows (:func:`slices`), which bounds
the activation memory of a pass and is the unit that the ranks of a torchrun job share
(:func:`ditrt.distributed.my_chunks`): a slice computes the same bits on any rank and in a single
process. The statistics then reduce exactly: maxima by an all-reduce max, and the random subsets,
chosen by their index in the whole batch (never by rank), are assembled in that index order.
Statistics stay on the device the model runs on; callers move what leaves (``.cpu()``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn

from ditrt.diffusion.recording import CalibBatch
from ditrt.distributed import SINGLE, World, all_reduce_max, all_reduce_sum, chunk_ranges, my_chunks

#: Rows per forward pass of an observation pass: a recorded batch (64 rows for 32 samples with guidance)
#: runs in slices of this many rows. Fixed, never derived from the number of processes. DiT-XL/2 (256
#: tokens, hidden 1152): 75 MB per (rows, tokens, 4 x hidden) MLP activation, 67 MB per attention map.
OBSERVE_ROWS = 16


@dataclass(frozen=True)
class Slice:
    """Rows ``start:stop`` of recorded batch ``batch``, which has ``rows`` rows in all."""

    batch: int
    start: int
    stop: int
    rows: int


def slices(batches: list[CalibBatch], rows: int = OBSERVE_ROWS) -> list[Slice]:
    """The fixed slices of ``batches``, batch by batch: the units of work of an observation pass."""
    return [Slice(b, r.start, r.stop, len(x)) for b, (x, _, _) in enumerate(batches) for r in chunk_ranges(len(x), rows)]


def run_sliced(model: nn.Module, hooks: dict, batches: list[CalibBatch], *, device="cpu", world: World = SINGLE,
               rows: int = OBSERVE_ROWS) -> None:  # fmt: skip
    """Run this rank's slices of ``batches`` through ``model`` (no grad) with ``hooks[name](slice, input)``
    called on the input of each named submodule; the hooks are removed afterwards, also on error."""
    units = slices(batches, rows)
    current: list[Slice | None] = [None]

    def pre_hook(hook):
        return lambda _module, inputs: hook(current[0], inputs[0])

    handles = [model.get_submodule(n).register_forward_pre_hook(pre_hook(h)) for n, h in hooks.items()]
    try:
        with torch.no_grad():
            for k in my_chunks(len(units), world):
                s = current[0] = units[k]
                x, t, y = batches[s.batch]
                model(x[s.start : s.stop].to(device), t[s.start : s.stop].to(device), y[s.start : s.stop].to(device))
    finally:
        for h in handles:
            h.remove()


def _generator(seed: int, layer: str, batch: int) -> torch.Generator:
    """The generator of one layer's subset of one batch: a function of (seed, layer, batch) only, so every
    rank draws the same subset whichever slices it runs."""
    digest = hashlib.sha256(f"{seed}:{layer}:{batch}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


class _Subset:
    """Chosen indices into a whole batch (``chosen[p]`` goes to position ``p``), looked up by slice range.

    Sorted once on the CPU, so the positions a slice fills are found without a device sync."""

    def __init__(self, chosen: torch.Tensor):
        self.order = torch.argsort(chosen, stable=True)
        self.sorted = chosen[self.order]

    def within(self, lo: int, hi: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(positions, indices - lo)`` of the chosen indices in ``[lo, hi)``, on ``device``."""
        a, b = (int(i) for i in torch.searchsorted(self.sorted, torch.tensor([lo, hi])))
        return self.order[a:b].to(device), (self.sorted[a:b] - lo).to(device)


def _assemble(buffer: torch.Tensor, world: World) -> torch.Tensor:
    """Entries that exactly one rank wrote (the others hold 0.0) as that rank's bits: the int32 sum of the
    bit patterns is exact (a float sum would turn -0.0 into 0.0). ``buffer``: contiguous float32, in place."""
    all_reduce_sum(buffer.view(torch.int32), world)
    return buffer


class LayerStats:
    """What was seen at the input of one Linear (``channels`` inputs): the per-channel max |X| at each of
    ``batches`` recorded steps, ``absmax``/``min``/``max`` over everything, and ``samples_per_batch``
    values per step drawn at random positions of the whole batch (all of them if it holds fewer).

    Buffers are allocated once, on ``device``: keeping one small new tensor per call alive between the
    forward pass's large temporaries fragments glibc's heap, which grew a CPU calibration of the
    built-in model to several GB. A Linear called twice in one forward pass adds both calls to its
    maxima; its subset holds the last call's values.
    """

    def __init__(self, name: str, batches: int, channels: int, *, samples_per_batch: int = 4096, seed: int = 0, device="cpu"):
        self.name, self.samples_per_batch, self.seed = name, samples_per_batch, seed
        self._channel_max = torch.zeros(batches, channels, device=device)
        self._samples = torch.zeros(batches, samples_per_batch, device=device)
        self._range = torch.full((2,), float("-inf"), device=device)  # (-min, max)
        self._counts = torch.zeros(batches, dtype=torch.int64)  # values kept per step (known to the ranks that ran it)
        self._subset: tuple[int, _Subset] | None = None  # (batch, its subset): slices come batch by batch

    def _subset_of(self, batch: int, total: int) -> _Subset:
        if self._subset is None or self._subset[0] != batch:
            n = min(total, self.samples_per_batch)
            chosen = torch.arange(total) if n == total else torch.randint(0, total, (n,), generator=_generator(self.seed, self.name, batch))
            self._subset = (batch, _Subset(chosen))
            self._counts[batch] = n
        return self._subset[1]

    def add(self, s: Slice, x: torch.Tensor) -> None:
        """The input ``x`` (slice rows, ..., C) of slice ``s``."""
        flat = x.detach().float().reshape(-1, x.shape[-1])  # (tokens, C)
        per_row = flat.numel() // (s.stop - s.start)
        positions, index = self._subset_of(s.batch, per_row * s.rows).within(s.start * per_row, s.stop * per_row, flat.device)
        self._samples[s.batch, positions] = flat.reshape(-1)[index]
        step_max = self._channel_max[s.batch]
        torch.maximum(step_max, flat.abs().amax(dim=0), out=step_max)
        torch.maximum(self._range, torch.stack([-flat.min(), flat.max()]), out=self._range)

    def reduce(self, world: World) -> LayerStats:
        """Combine the ranks' statistics (every rank then holds the whole): exact, as the slices are disjoint."""
        if world.distributed:
            all_reduce_max(self._channel_max, world)
            all_reduce_max(self._range, world)
            _assemble(self._samples, world)
            self._counts = all_reduce_max(self._counts.to(self._range.device), world).cpu()
        return self

    def channel_max_by_step(self) -> torch.Tensor:
        """(T, C): per-channel max |X| of each recorded step."""
        return self._channel_max

    @property
    def absmax(self) -> float:
        return float(self._channel_max.max()) if self._channel_max.numel() else 0.0

    @property
    def min(self) -> float:
        return -float(self._range[0])

    @property
    def max(self) -> float:
        return float(self._range[1])

    def sample_values(self) -> torch.Tensor:
        """The subsets of every step, in step order (a single zero before any input was seen)."""
        if not int(self._counts.sum()):
            return torch.zeros(1, device=self._samples.device)
        return torch.cat([self._samples[b, :n] for b, n in enumerate(self._counts.tolist())])


def _in_features(model: nn.Module, name: str) -> int:
    return model.get_submodule(name).weight.shape[-1]


def observe_linear_inputs(
    model: nn.Module,
    layers: list[str],
    batches: list[CalibBatch],
    *,
    device: str = "cpu",
    samples_per_batch: int = 4096,
    seed: int = 0,
    world: World = SINGLE,
    rows: int = OBSERVE_ROWS,
) -> dict[str, LayerStats]:
    """Run ``batches`` (one per recorded step) through ``model`` and collect :class:`LayerStats`
    for the input of each named Linear; in a torchrun job each rank runs its slices and every rank
    gets the reduced statistics, equal to a single process's. ``rows``: rows per forward pass."""
    n = max(1, len(batches))
    stats = {name: LayerStats(name, n, _in_features(model, name), samples_per_batch=samples_per_batch, seed=seed, device=device)
             for name in layers}  # fmt: skip
    run_sliced(model, {n: stats[n].add for n in layers}, batches, device=device, world=world, rows=rows)
    return {name: st.reduce(world) for name, st in stats.items()}


@dataclass(frozen=True)
class LayerInputs:
    """What one Linear saw: sampled token rows ``rows`` (N, C) and ``channel_max`` (C,), the max |x_j|
    over every token of every batch (DiTAS' temporal aggregation)."""

    rows: torch.Tensor
    channel_max: torch.Tensor


class _RowBuffer:
    """Sampled token rows (``per_batch`` of each batch, chosen among all its tokens) and the running
    channel max of one layer, in buffers allocated once (see :class:`LayerStats`)."""

    def __init__(self, name: str, batches: int, channels: int, per_batch: int, seed: int, device):
        self.name, self.per_batch, self.seed = name, per_batch, seed
        self.rows = torch.zeros(batches * per_batch, channels, device=device)
        self.channel_max = torch.zeros(channels, device=device)
        self._counts = torch.zeros(batches, dtype=torch.int64)
        self._subset: tuple[int, _Subset] | None = None

    def _subset_of(self, batch: int, tokens: int) -> _Subset:
        if self._subset is None or self._subset[0] != batch:
            chosen = torch.randperm(tokens, generator=_generator(self.seed, self.name, batch))[: self.per_batch]
            self._subset = (batch, _Subset(chosen))
            self._counts[batch] = chosen.numel()
        return self._subset[1]

    def add(self, s: Slice, x: torch.Tensor) -> None:
        flat = x.detach().float().reshape(-1, x.shape[-1])  # (tokens, C)
        per_row = flat.shape[0] // (s.stop - s.start)  # tokens of one batch row
        positions, index = self._subset_of(s.batch, per_row * s.rows).within(s.start * per_row, s.stop * per_row, flat.device)
        self.rows[s.batch * self.per_batch + positions] = flat[index]
        torch.maximum(self.channel_max, flat.abs().amax(dim=0), out=self.channel_max)

    def reduce(self, world: World) -> LayerInputs:
        if world.distributed:
            all_reduce_max(self.channel_max, world)
            _assemble(self.rows, world)
            self._counts = all_reduce_max(self._counts.to(self.rows.device), world).cpu()
        kept = torch.cat([self.rows[b * self.per_batch : b * self.per_batch + n] for b, n in enumerate(self._counts.tolist())])
        return LayerInputs(kept, self.channel_max)


def capture_layer_inputs(
    model: nn.Module,
    layers: list[str],
    batches: list[CalibBatch],
    *,
    tokens_per_batch: int = 64,
    seed: int = 0,
    device: str = "cpu",
    world: World = SINGLE,
    rows: int = OBSERVE_ROWS,
) -> dict[str, LayerInputs]:
    """Run ``batches`` through ``model`` and record, for the input of each named Linear, a random subset
    of ``tokens_per_batch`` token rows per batch (all of them if fewer; full channel vectors, concatenated
    over batches, on ``device``) and the per-channel max |x| over all tokens of all batches. In a torchrun
    job each rank runs its slices and every rank gets the whole, equal to a single process's."""
    n = max(1, len(batches))
    buffers = {name: _RowBuffer(name, n, _in_features(model, name), tokens_per_batch, seed, device) for name in layers}
    run_sliced(model, {n: buffers[n].add for n in layers}, batches, device=device, world=world, rows=rows)
    return {name: buf.reduce(world) for name, buf in buffers.items()}


def observe_input_grams(
    model: nn.Module,
    layers: list[str],
    batches: list[CalibBatch],
    *,
    device: str = "cpu",
    world: World = SINGLE,
    rows: int = OBSERVE_ROWS,
) -> dict[str, torch.Tensor]:
    """Run ``batches`` through ``model`` and return, for the input of each named Linear (``C`` inputs), the
    Gram matrix ``H = sum_x x x^T`` (C, C) over every token row ``x`` of every batch: GPTQ's Hessian up to
    a constant factor (the token count, which GPTQ's relative damping makes irrelevant).

    Each slice's ``X^T X`` is one float32 matrix product (1024 token rows on the built-in model, 4096 on
    DiT-XL/2: relative error around 1e-7, unless the caller enabled TF32 matmuls) added to a float64
    accumulator on ``device``: on this CPU a float64 product made the pass 2.7x as long as the forward
    passes alone, the float32 one 1.3x, and GPTQ's INT4 integers on the two differ in 0.01% of the weights.
    In a torchrun job every rank sums its own slices and the ranks' sums are added by an all-reduce: the
    result equals a single process's up to the float64 summation order (relative differences around
    1e-16), not bit for bit. Memory: one float64 C x C matrix per layer (DiT-XL/2: 10.6 MB at C = 1152,
    170 MB for fc2's C = 4608) and one slice's float32 product."""
    grams = {name: torch.zeros(_in_features(model, name), _in_features(model, name), dtype=torch.float64, device=device)
             for name in layers}  # fmt: skip

    def accumulate(name: str):
        gram = grams[name]

        def add(_s: Slice, x: torch.Tensor) -> None:
            flat = x.detach().reshape(-1, x.shape[-1]).float()  # (tokens, C)
            gram.add_(flat.T @ flat)

        return add

    run_sliced(model, {name: accumulate(name) for name in layers}, batches, device=device, world=world, rows=rows)
    for gram in grams.values():
        all_reduce_sum(gram, world)
    return grams
