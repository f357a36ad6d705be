"""Recording the denoiser inputs of a sampling run: calibration data and paired comparisons.

As PTQ4DiT does it: run the float DDPM sampler (cfg 1.5) and record the model inputs
``(x_t, t, y)`` at uniformly spaced steps, each call holding the conditional and the null-class half.

The recorded samples are sampled in fixed chunks of :data:`CHUNK_SAMPLES` samples
(:func:`ditrt.distributed.chunk_ranges`), on one process or spread over the ranks of a torchrun job
(:func:`ditrt.distributed.my_chunks`), and the chunks are reassembled in sample order
(:func:`merge_chunks`): every chunk runs with the same batch composition whatever the number of
processes, so 1 and N processes record bit-identical inputs.
"""

from __future__ import annotations

import torch
from torch import nn

from ditrt.contracts.recipe import CalibrationSettings
from ditrt.diffusion.sampler import SamplerConfig, sample
from ditrt.diffusion.schedule import make_schedule
from ditrt.distributed import SINGLE, World, all_gather_objects, chunk_ranges, my_chunks

CalibBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # x (B, C, H, W), t (B,), y (B,)

#: Samples per recording chunk (16 rows per model call with guidance). Fixed, never derived from the
#: number of processes: it is part of what makes the recorded inputs bit-identical on 1 or N processes.
CHUNK_SAMPLES = 8


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


def merge_chunks(chunks: list[list[CalibBatch]], *, guided: bool) -> list[CalibBatch]:
    """The recordings of consecutive sample chunks (each a list of recorded calls, one per step) as one
    batch per step, rows in sample order. With guidance each chunk's call holds its conditional rows
    then its null-class rows; so does the result: ``[cond of chunk 0, 1, ..., null of chunk 0, 1, ...]``,
    the layout one call over all samples has."""
    if len({len(c) for c in chunks}) != 1:
        raise ValueError(f"chunks recorded different numbers of steps: {[len(c) for c in chunks]}")

    def rows(parts: list[torch.Tensor]) -> torch.Tensor:
        if not guided:
            return torch.cat(parts)
        halves = [p.shape[0] // 2 for p in parts]
        return torch.cat([p[:h] for p, h in zip(parts, halves)] + [p[h:] for p, h in zip(parts, halves)])

    return [tuple(rows([c[step][j] for c in chunks]) for j in range(3)) for step in range(len(chunks[0]))]


def record_calibration_inputs(
    model: nn.Module,
    settings: CalibrationSettings,
    *,
    device: str = "cpu",
    pixel_space: bool = False,
    progress: bool = False,
    world: World = SINGLE,
    chunk: int = CHUNK_SAMPLES,
) -> list[CalibBatch]:
    """The model inputs at ``settings.timesteps`` uniformly spaced steps of a float sampling run.

    Sample i has its own seed and label (as with one call over all samples); the samples run in
    chunks of ``chunk``, rank ``world.rank`` of a torchrun job taking its share of them, and every rank
    gets every recorded batch (CPU tensors, gathered from the ranks and put back in sample order).
    ``progress``: a bar over this rank's chunks and the sampling steps of each."""
    cfg = model.config
    cfg.check_guidance(settings.cfg_scale, "the model")
    schedule = make_schedule(settings.steps)
    keep = uniform_indices(schedule.num_steps, settings.timesteps)
    g = torch.Generator().manual_seed(settings.seed)
    labels = torch.randint(0, cfg.num_classes, (settings.samples,), generator=g).tolist()
    seeds = [settings.seed * 100_003 + i for i in range(settings.samples)]
    sampler = SamplerConfig(steps=settings.steps, cfg_scale=settings.cfg_scale, clip_denoised=pixel_space)
    ranges = chunk_ranges(settings.samples, chunk)
    mine = my_chunks(len(ranges), world)
    if progress:
        from tqdm.auto import tqdm

        mine = tqdm(mine, desc=f"recording {settings.samples} samples in chunks of {chunk}", unit="chunk")
    recorded = {}
    for c in mine:
        recorder, r = Recorder(model, keep=keep), ranges[c]
        with torch.no_grad():
            sample(
                recorder, sampler, labels[r.start : r.stop], seeds[r.start : r.stop], num_classes=cfg.num_classes,
                image_shape=(cfg.in_channels, cfg.input_size, cfg.input_size), device=device, progress=progress,
            )  # fmt: skip
        recorded[c] = recorder.records
    for part in all_gather_objects(recorded, world):
        recorded.update(part)
    return merge_chunks([recorded[c] for c in range(len(ranges))], guided=settings.cfg_scale != 1.0)
