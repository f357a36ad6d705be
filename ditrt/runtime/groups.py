"""Timestep groups at run time: one graph (or engine) per range of timesteps, picked per call.

A recipe calibrated with K timestep groups exports K graphs that share the weights and differ in
their activation scales, plus a manifest (``<stem>.groups.json``: the descending timestep edges and
the graph files). :class:`TimestepGroupDenoiser` wraps one denoiser per group and sends each call
to the group of its timestep, so the sampler loop does not know groups exist. A single graph or
engine is a one-group manifest (:func:`ditrt.contracts.groups.read_artifact`), so every graph and
engine is sampled through this class.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ditrt.contracts.errors import ArtifactError
from ditrt.contracts.groups import read_manifest
from ditrt.contracts.recipe import batch_timestep_group, timestep_group


class TimestepGroupDenoiser:
    """Calls ``denoisers[g]`` for the timestep group ``g`` of each call (a batch must not mix groups)."""

    def __init__(self, denoisers: list, edges: tuple[float, ...]):
        if len(denoisers) != len(edges) + 1:
            raise ArtifactError(f"{len(denoisers)} graphs for {len(edges) + 1} timestep groups; re-run `ditrt export`")
        self.denoisers, self.edges = list(denoisers), tuple(edges)

    @classmethod
    def from_manifest(cls, path, make: Callable[[Path], object], kind: str = "onnx") -> TimestepGroupDenoiser:
        """One denoiser per file of the manifest, from ``make(file)``; ``kind``: "onnx" or "tensorrt"."""
        edges, graphs = read_manifest(path, kind)
        return cls([make(g) for g in graphs], edges)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if len(self.denoisers) == 1:  # a single graph: no per-call group lookup (it would read t back from the GPU)
            return self.denoisers[0](x, t, y)
        return self.denoisers[batch_timestep_group(t, self.edges)](x, t, y)

    def at_timestep(self, t: float):
        """The denoiser of timestep ``t``'s group, for a caller that knows ``t`` on the host (the sampler):
        calling it directly spares the read of ``t`` back from the device that every call would make."""
        return self.denoisers[timestep_group(t, self.edges)]

    def close(self) -> None:
        """Close every group's denoiser that holds resources (TensorRT engines)."""
        for d in self.denoisers:
            close = getattr(d, "close", None)
            if close is not None:
                close()
