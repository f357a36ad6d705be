"""Quality metrics on the built-in digits domain.

- FD: Frechet distance between Gaussians fitted to the classifier's 128-d penultimate features of
  generated samples and of the 1797 real digits (the FID recipe with a domain-appropriate network),
  reported with its floor, the FD between two fixed halves of the real data.
- class accuracy: the classifier's prediction against the requested labels.
- paired PSNR: two sample sets made from the same seeds and labels (float vs quantized model).
- per-timestep relative error between two denoisers evaluated on the same recorded inputs.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

from ditrt.contracts.errors import InputError

PSNR_CAP_DB = 200.0  # identical sets give infinite PSNR; JSON has no infinity


def check_finite(x, what: str = "the samples") -> None:
    """Refuse NaN/inf values (a diverged or corrupted sample set): no metric of them means anything."""
    a = np.asarray(x)
    if np.issubdtype(a.dtype, np.floating):
        bad = int(a.size - np.isfinite(a).sum())
        if bad:
            rows = int((~np.isfinite(a.reshape(len(a), -1))).any(1).sum()) if a.ndim > 1 else bad
            raise InputError(f"{what} hold {bad} NaN/inf values (in {rows} of {len(a)} samples); re-sample them (the model or recipe diverged)")


def _as_images(x) -> torch.Tensor:
    check_finite(x)
    x = torch.as_tensor(np.asarray(x), dtype=torch.float32)
    if x.ndim != 4 or tuple(x.shape[1:]) != (1, 8, 8):
        raise InputError(f"the digits evaluator needs (N, 1, 8, 8) images, got {tuple(x.shape)}; evaluate samples of the built-in model")
    return x.clamp(-1, 1)


@lru_cache(maxsize=1)
def _classifier():
    from ditrt.quality.classifier import load_classifier

    return load_classifier()


def features(images) -> np.ndarray:
    """(N, 1, 8, 8) in [-1, 1] -> (N, 128) float64 penultimate features."""
    with torch.no_grad():
        return _classifier().features(_as_images(images)).double().numpy()


def predict(images) -> np.ndarray:
    with torch.no_grad():
        return _classifier()(_as_images(images)).argmax(1).numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between two feature sets (N, D): the FID
    computation of :func:`ditrt.quality.fid.frechet_distance`, taking the real part of the root (small
    digits sets have fewer samples than feature dimensions)."""
    from ditrt.quality.fid import GaussianStats
    from ditrt.quality.fid import frechet_distance as fid_distance

    if len(a) < 2 or len(b) < 2:
        raise InputError("FD needs at least 2 samples in each set; sample more images")
    return fid_distance(GaussianStats.of(a), GaussianStats.of(b), imag_atol=math.inf)


@lru_cache(maxsize=1)
def real_features() -> np.ndarray:
    from ditrt.data.digits import load_digits_tensors

    return features(load_digits_tensors()[0])


def fd_to_real(images) -> float:
    return frechet_distance(features(images), real_features())


@lru_cache(maxsize=1)
def fd_floor() -> float:
    """FD between two fixed halves of the real digits: what a perfect model of this size would get."""
    from ditrt.data.digits import split_halves

    f = real_features()
    a, b = split_halves(len(f))
    return frechet_distance(f[a], f[b])


def class_accuracy(images, labels) -> float:
    labels = np.asarray(labels)
    return float((predict(images) == labels).mean())


def paired_psnr(a, b, *, data_range: float = 2.0, chunk: int = 256) -> float:
    """PSNR in dB of set ``b`` against set ``a`` (same seeds and labels), over all pixels; read ``chunk``
    samples at a time (memory-mapped 50k-image sets never sit whole in memory)."""
    if len(a) != len(b):
        raise InputError(f"paired PSNR needs two sample sets of the same shape, got {np.shape(a)} and {np.shape(b)}")
    total, count = 0.0, 0
    for s in range(0, len(a), chunk):
        ra, rb = np.asarray(a[s : s + chunk], dtype=np.float64), np.asarray(b[s : s + chunk], dtype=np.float64)
        check_finite(ra, "the reference samples")
        check_finite(rb)
        if ra.shape != rb.shape:
            raise InputError(f"paired PSNR needs two sample sets of the same shape, got {ra.shape} and {rb.shape} (from sample {s})")
        ra, rb = np.clip(ra, -data_range / 2, data_range / 2), np.clip(rb, -data_range / 2, data_range / 2)
        total, count = total + float(((ra - rb) ** 2).sum()), count + ra.size
    mse = total / max(count, 1)
    return PSNR_CAP_DB if mse == 0 else min(PSNR_CAP_DB, 10 * math.log10(data_range**2 / mse))


def relative_error(ref: torch.Tensor, test: torch.Tensor) -> float:
    """||test - ref|| / ||ref|| over the whole tensor."""
    ref, test = ref.double(), test.double()
    return float((test - ref).norm() / ref.norm().clamp(min=1e-30))


def error_by_timestep(ref_denoiser, test_denoiser, records, *, channels: int | None = None) -> list[dict]:
    """Relative error of ``test`` against ``ref`` on recorded inputs, one row per timestep.

    ``records`` is a list of ``(x, t, y)`` batches (as :class:`ditrt.diffusion.recording.Recorder`
    keeps them); ``channels`` restricts the comparison to the first channels (the noise prediction).
    """
    rows = []
    with torch.no_grad():
        for x, t, y in records:
            a, b = ref_denoiser(x, t, y), test_denoiser(x, t, y)
            if channels is not None:
                a, b = a[:, :channels], b[:, :channels]
            rows.append({"t": float(t[0]), "rel_error": relative_error(a, b)})
    return rows
