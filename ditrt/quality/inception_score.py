"""Inception Score as the ADM evaluator computes it (from improved-GAN): exp of the mean KL divergence
between each image's class distribution p(y|x) and their mean p(y), per split of 5000 consecutive
images, averaged over the splits (a last, shorter split counts as one). Fewer than 5000 images make
one split; IS grows with the split size, so such a score is not comparable to published 50k ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ditrt.contracts.errors import InputError

SPLIT = 5000


@dataclass(frozen=True)
class InceptionScore:
    score: float
    splits: int
    split_size: int


def inception_score(probs: np.ndarray, split_size: int = SPLIT) -> InceptionScore:
    """(N, K) class probabilities (the network's ``no_output_bias`` softmax) -> the score over its splits.

    0 log 0 counts as 0 (its limit), where the ADM code would give NaN."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or len(p) < 1:
        raise InputError(f"the Inception Score needs (N, classes) probabilities, got {p.shape}; evaluate at least one image")
    scores = []
    for start in range(0, len(p), split_size):
        part = p[start : start + split_size]
        mean = part.mean(0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(mean)), 0.0)
        scores.append(np.exp(kl.sum(1).mean()))
    return InceptionScore(float(np.mean(scores)), len(scores), min(split_size, len(p)))
