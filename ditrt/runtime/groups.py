"""Timestep groups at run time: one graph (or engine) per range of timesteps, picked per call.

A recipe calibrated with K timestep groups exports K graphs that share the weights and differ in
their activation scales, plus a manifest (``<stem>.groups.json``: the descending timestep edges and
the graph files). :class:`TimestepGroupDenoiser` wraps one denoiser per group and sends each call
to the group of its timestep, so the sampler loop does not know groups exist.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from ditrt.errors import ArtifactError, InputError
from ditrt.export.onnx_export import GROUPS_FORMAT
from ditrt.recipe import timestep_group


def is_group_manifest(path) -> bool:
    return str(path).endswith(".groups.json")


def read_manifest(path) -> tuple[tuple[float, ...], list[Path]]:
    """The edges and the graph paths (resolved beside the manifest) of a groups manifest."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"cannot read timestep-group manifest {path} ({e}); re-run `ditrt export`") from None
    if d.get("format") != GROUPS_FORMAT or len(d.get("graphs", ())) != len(d.get("edges", ())) + 1:
        raise ArtifactError(f"{path} is not a ditrt timestep-group manifest; re-run `ditrt export` with the recipe")
    graphs = [path.parent / g for g in d["graphs"]]
    missing = [g for g in graphs if not g.exists()]
    if missing:
        raise ArtifactError(f"{missing[0]} listed in {path} is missing; re-run `ditrt export` with the recipe")
    return tuple(float(e) for e in d["edges"]), graphs


class TimestepGroupDenoiser:
    """Calls ``denoisers[g]`` for the timestep group ``g`` of each call (a batch must not mix groups)."""

    def __init__(self, denoisers: list, edges: tuple[float, ...]):
        if len(denoisers) != len(edges) + 1:
            raise ArtifactError(f"{len(denoisers)} graphs for {len(edges) + 1} timestep groups; re-run `ditrt export`")
        self.denoisers, self.edges = list(denoisers), tuple(edges)

    @classmethod
    def from_manifest(cls, path, make: Callable[[Path], object]) -> TimestepGroupDenoiser:
        edges, graphs = read_manifest(path)
        return cls([make(g) for g in graphs], edges)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        groups = {timestep_group(v, self.edges) for v in t.reshape(-1).tolist()}
        if len(groups) != 1:
            raise InputError("a batch mixes timesteps of different activation-scale groups; call one group at a time")
        return self.denoisers[groups.pop()](x, t, y)
