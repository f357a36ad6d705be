"""Quality metrics on the built-in digits domain.

- FD: Frechet distance between Gaussians fitted to the classifier's 128-d penultimate features of
  generated samples and of the 1797 real digits (the FID recipe with a domain-appropriate network),
  reported with its floor, the FD between two fixed halves of the real data.
- class accuracy: the classifier's prediction against the requested labels.
- paired PSNR: two sample sets made from the same seeds and labels (float vs quantized model),
  with a percentile bootstrap interval over samples (:func:`paired_psnr_interval`).
- per-timestep relative error between two denoisers evaluated on the same recorded inputs.
- one-step SQNR of the noise prediction, 10 log10(|eps_float|^2 / |eps_q - eps_float|^2), per timestep,
  mean over timesteps and pooled (:func:`noise_sqnr`, :func:`sqnr_by_timestep`).
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


def sample_squared_errors(a, b, *, data_range: float = 2.0, chunk: int = 256) -> tuple[np.ndarray, int]:
    """``(sums, pixels)``: per sample the summed squared error (float64, (N,)) of set ``b`` against set ``a``
    after clipping both to the data range, and the values per sample; read ``chunk`` samples at a time
    (memory-mapped 50k-image sets never sit whole in memory)."""
    if len(a) != len(b):
        raise InputError(f"paired PSNR needs two sample sets of the same shape, got {np.shape(a)} and {np.shape(b)}")
    sums, pixels = [], 0
    for s in range(0, len(a), chunk):
        ra, rb = np.asarray(a[s : s + chunk], dtype=np.float64), np.asarray(b[s : s + chunk], dtype=np.float64)
        check_finite(ra, "the reference samples")
        check_finite(rb)
        if ra.shape != rb.shape:
            raise InputError(f"paired PSNR needs two sample sets of the same shape, got {ra.shape} and {rb.shape} (from sample {s})")
        ra, rb = np.clip(ra, -data_range / 2, data_range / 2), np.clip(rb, -data_range / 2, data_range / 2)
        sums.append(((ra - rb) ** 2).reshape(len(ra), -1).sum(1))
        pixels = ra[0].size
    return (np.concatenate(sums) if sums else np.zeros(0)), pixels


def _psnr_db(mse, data_range: float):
    """PSNR in dB of a mean squared error (a number or an array), capped at :data:`PSNR_CAP_DB`."""
    mse = np.asarray(mse, dtype=np.float64)
    with np.errstate(divide="ignore"):
        db = np.where(mse > 0, 10 * np.log10(data_range**2 / np.where(mse > 0, mse, 1.0)), PSNR_CAP_DB)
    return np.minimum(db, PSNR_CAP_DB)


def paired_psnr(a, b, *, data_range: float = 2.0, chunk: int = 256) -> float:
    """PSNR in dB of set ``b`` against set ``a`` (same seeds and labels), over all pixels (the pooled MSE);
    read ``chunk`` samples at a time (memory-mapped 50k-image sets never sit whole in memory)."""
    sums, pixels = sample_squared_errors(a, b, data_range=data_range, chunk=chunk)
    return float(_psnr_db(sums.sum() / max(len(sums) * pixels, 1), data_range))


def paired_psnr_interval(a, b, *, confidence: float = 0.95, resamples: int = 2000, seed: int = 0, data_range: float = 2.0,
                         chunk: int = 256) -> tuple[float, float, float]:
    """``(psnr, lo, hi)`` in dB: :func:`paired_psnr` of ``b`` against ``a`` and its percentile bootstrap
    interval at ``confidence``: ``resamples`` times, N whole samples are drawn with replacement and the
    PSNR of their pooled MSE is taken; ``lo``/``hi`` are the (1 -/+ confidence)/2 quantiles of those.
    Only the per-sample squared errors are resampled, a block of resamples at a time (about 32 MB).
    Deterministic for a given ``seed``; one sample gives a zero-width interval."""  # fmt: skip
    if not 0 < confidence < 1:
        raise InputError(f"confidence must lie in (0, 1), got {confidence}; 0.95 is a 95% interval")
    if resamples < 1:
        raise InputError(f"the bootstrap needs at least 1 resample, got {resamples}")
    sums, pixels = sample_squared_errors(a, b, data_range=data_range, chunk=chunk)
    n = len(sums)
    if n == 0:
        raise InputError("paired PSNR intervals need at least 1 sample in each set; sample more images")
    psnr = float(_psnr_db(sums.sum() / (n * pixels), data_range))
    rng = np.random.default_rng(seed)
    block = max(1, (1 << 22) // n)
    boot = np.concatenate([
        sums[rng.integers(0, n, size=(min(block, resamples - s), n))].sum(1) / (n * pixels) for s in range(0, resamples, block)
    ])  # fmt: skip
    lo, hi = np.percentile(_psnr_db(boot, data_range), [50 * (1 - confidence), 50 * (1 + confidence)])
    return psnr, float(lo), float(hi)


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


def noise_sqnr(eps_float, eps_q) -> float:
    """10 log10(|eps_float|^2 / |eps_q - eps_float|^2) in dB over the whole tensors (float64 sums),
    capped at +-:data:`PSNR_CAP_DB` (identical tensors, or a zero reference)."""
    return _sqnr_db(*_energies(eps_float, eps_q))


def _energies(ref, test) -> tuple[float, float]:
    """``(|ref|^2, |test - ref|^2)`` in float64."""
    ref, test = torch.as_tensor(ref).double(), torch.as_tensor(test).double()
    if ref.shape != test.shape:
        raise InputError(f"SQNR needs two tensors of the same shape, got {tuple(ref.shape)} and {tuple(test.shape)}")
    check_finite(ref.numpy(), "the reference noise prediction")
    check_finite(test.numpy(), "the noise prediction")
    return float((ref**2).sum()), float(((test - ref) ** 2).sum())


def _sqnr_db(signal: float, noise: float) -> float:
    if noise == 0:
        return PSNR_CAP_DB
    if signal == 0:
        return -PSNR_CAP_DB
    return float(np.clip(10 * math.log10(signal / noise), -PSNR_CAP_DB, PSNR_CAP_DB))


def sqnr_by_timestep(ref_denoiser, test_denoiser, records, *, channels: int | None = None) -> dict:
    """One-step SQNR of ``test`` against ``ref`` on recorded inputs: ``{"per_timestep": [{"t", "sqnr_db"}],
    "mean_db", "pooled_db"}``, ``mean_db`` the mean of the per-timestep dBs, ``pooled_db`` the SQNR of
    all timesteps' energies summed (dominated by the steps where the error is largest in absolute terms).

    ``records``: ``(x, t, y)`` batches, one per timestep (as :func:`ditrt.diffusion.recording.record_calibration_inputs`
    returns them); ``channels``: compare only the first channels (the noise prediction of a model that
    also predicts its variance)."""
    rows, signal, noise = [], 0.0, 0.0
    with torch.no_grad():
        for x, t, y in records:
            a, b = ref_denoiser(x, t, y), test_denoiser(x, t, y)
            if channels is not None:
                a, b = a[:, :channels], b[:, :channels]
            s, n = _energies(a, b)
            signal, noise = signal + s, noise + n
            rows.append({"t": float(t[0]), "sqnr_db": _sqnr_db(s, n)})
    if not rows:
        raise InputError("SQNR by timestep needs at least one recorded batch; record the inputs first")
    return {"per_timestep": rows, "mean_db": float(np.mean([r["sqnr_db"] for r in rows])), "pooled_db": _sqnr_db(signal, noise)}
