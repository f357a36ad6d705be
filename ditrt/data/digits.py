"""The built-in dataset: scikit-learn's 1797 real 8x8 handwritten digits (UCI optdigits test set),
which ship inside scikit-learn, so nothing is downloaded."""

from __future__ import annotations

import numpy as np
import torch

NUM_CLASSES = 10
IMAGE_SHAPE = (1, 8, 8)


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """Images (1797, 1, 8, 8) float32 scaled from the 0..16 ink levels to [-1, 1], labels (1797,) int64."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy(d.images.astype(np.float32) / 8.0 - 1.0).unsqueeze(1)
    return images, torch.from_numpy(d.target.astype(np.int64))


def split_halves(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A fixed random split of ``range(n)`` into two halves (for the FD floor)."""
    perm = np.random.default_rng(seed).permutation(n)
    return perm[: n // 2], perm[n // 2 :]
