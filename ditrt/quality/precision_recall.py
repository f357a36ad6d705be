"""Improved precision and recall (Kynkaanniemi et al. 2019) as the ADM evaluator's ``ManifoldEstimator``
computes them on Inception pool_3 features.

Each set's manifold is the union of balls around its points whose radius is the squared Euclidean
distance to the point's k-th nearest neighbour (k = 3; the point itself is the 0-th, so the radius
is the (k+1)-th smallest distance to the set). Precision is the fraction of samples inside some
reference ball (``distance <= radius``), recall the fraction of reference images inside some sample
ball. Distances are ``max(|u|^2 - 2 u.v + |v|^2, 0)`` in float32, computed in blocks of ``block`` x
``block`` pairs, so memory stays bounded for 50k x 50k pairs. (The ADM code first tries float16
distances and falls back to float32 when they overflow; here they are always float32, which can
decide a point lying on a ball's boundary differently.)
"""

from __future__ import annotations

import numpy as np
import torch

from ditrt.contracts.errors import InputError

K = 3
BLOCK = 4096


def squared_distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(n, D), (m, D) -> (n, m) squared Euclidean distances, clamped at 0 as the ADM code does."""
    return ((u * u).sum(1, keepdim=True) - 2 * u @ v.T + (v * v).sum(1)[None]).clamp_min(0)


def _blocks(n: int, block: int):
    return [slice(s, min(s + block, n)) for s in range(0, n, block)]


def manifold_radii(features: torch.Tensor, k: int = K, block: int = BLOCK) -> torch.Tensor:
    """(N, D) -> (N,) the squared distance of each point to its k-th nearest neighbour in the set."""
    radii = torch.empty(len(features), dtype=features.dtype, device=features.device)
    for rows in _blocks(len(features), block):
        best = None
        for cols in _blocks(len(features), block):
            d = squared_distances(features[rows], features[cols])
            d = d if best is None else torch.cat([best, d], 1)
            best = d.topk(min(k + 1, d.shape[1]), dim=1, largest=False).values  # sorted ascending
        radii[rows] = best[:, k]
    return radii


def precision_recall(reference: np.ndarray, samples: np.ndarray, *, k: int = K, block: int = BLOCK,
                     device: str = "cpu") -> tuple[float, float]:  # fmt: skip
    """(precision, recall) of ``samples`` (N, D) against ``reference`` (M, D) pool_3 features."""
    if len(reference) <= k or len(samples) <= k:
        raise InputError(f"precision/recall with k={k} needs more than {k} images in each set, got {len(samples)} and {len(reference)}")
    ref = torch.as_tensor(np.asarray(reference), dtype=torch.float32, device=device)
    smp = torch.as_tensor(np.asarray(samples), dtype=torch.float32, device=device)
    r_ref, r_smp = manifold_radii(ref, k, block), manifold_radii(smp, k, block)
    ref_in = torch.zeros(len(ref), dtype=torch.bool, device=device)
    smp_in = torch.zeros(len(smp), dtype=torch.bool, device=device)
    for i in _blocks(len(ref), block):
        for j in _blocks(len(smp), block):
            d = squared_distances(ref[i], smp[j])  # (reference rows, sample columns)
            smp_in[j] |= (d <= r_ref[i, None]).any(0)
            ref_in[i] |= (d <= r_smp[None, j]).any(1)
    return float(smp_in.double().mean()), float(ref_in.double().mean())
