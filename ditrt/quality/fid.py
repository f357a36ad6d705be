"""FID: the Frechet distance between Gaussians fitted to Inception pool_3 features, as the ADM
evaluator computes it, and the reference statistics it compares against.

``frechet_distance`` follows ``FIDStatistics.frechet_distance`` of openai/guided-diffusion
``evaluations/evaluator.py`` (itself from TTUR): float64, ``scipy.linalg.sqrtm`` of the product of the
covariances; when that root is not finite, eps = 1e-6 is added to both diagonals and the root taken
again; a complex root whose diagonal has an imaginary part above 1e-3 is an error, otherwise its real
part is used. One addition, exact in exact arithmetic: feature dimensions whose variance is zero in
both sets (dead units: their rows and columns are zero) add only their squared mean difference, so
they are left out of the square root (whose cost grows with the cube of the dimension; only in the
eps fallback would the full matrices differ, by -2 eps per such dimension).

Reference statistics come from the reference batch's images through the same network by default
(both sides measured alike), can be kept in a ``--reference-stats`` file (:class:`ReferenceStats`),
or come from the batch's own precomputed ``mu``/``sigma`` (:func:`adm_statistics`: computed by the
ADM evaluator's TensorFlow network, not by the file ditrt runs).
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ditrt.contracts.errors import ArtifactError, InputError

STATS_FORMAT = "ditrt-inception-reference-stats/1"
EPS = 1e-6  # the ADM evaluator's diagonal offset for a singular product
IMAG_ATOL = 1e-3  # its tolerance on the imaginary part of the root's diagonal


@dataclass(frozen=True)
class GaussianStats:
    """Mean (D,) and covariance (D, D) of a feature set, float64."""

    mu: np.ndarray
    sigma: np.ndarray

    @classmethod
    def of(cls, features: np.ndarray) -> GaussianStats:
        """(N, D) features -> their mean and unbiased covariance (``np.cov``, as the ADM evaluator), in float64."""
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2 or len(f) < 2:
            raise InputError(f"FID statistics need at least 2 feature vectors, got {f.shape}; evaluate more images")
        return cls(f.mean(0), np.cov(f, rowvar=False))


def frechet_distance(a: GaussianStats, b: GaussianStats, eps: float = EPS, imag_atol: float = IMAG_ATOL) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) with the ADM evaluator's rules (module docstring);
    ``imag_atol=inf`` takes the real part of any complex root (the digits evaluator's small sets)."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(a.mu).astype(np.float64), np.atleast_1d(b.mu).astype(np.float64)
    s1, s2 = np.atleast_2d(a.sigma).astype(np.float64), np.atleast_2d(b.sigma).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise InputError(f"FID statistics of different sizes: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    diff = mu1 - mu2
    live = s1.any(0) | s2.any(0)  # dimensions with any variance in either set
    s1, s2 = s1[np.ix_(live, live)], s2[np.ix_(live, live)]
    with warnings.catch_warnings():  # a singular product is expected with fewer samples than dimensions
        warnings.simplefilter("ignore")
        covmean = linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():
            offset = np.eye(len(s1)) * eps
            covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if np.isfinite(imag_atol) and not np.allclose(np.diagonal(covmean).imag, 0, atol=imag_atol):
            raise InputError(
                f"the covariance product has a complex square root (imaginary part up to {np.abs(covmean.imag).max():.3g}); "
                f"FID needs more images than the {len(mu1)} feature dimensions, evaluate more samples"
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _gaussian_arrays(mu, sigma, where: str) -> GaussianStats:
    mu, sigma = np.asarray(mu, dtype=np.float64), np.asarray(sigma, dtype=np.float64)
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise ArtifactError(f"{where}: mu {mu.shape} and sigma {sigma.shape} are not a mean (D,) and covariance (D, D)")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ArtifactError(f"{where}: mu or sigma holds NaN/inf values; recompute the statistics")
    return GaussianStats(mu, sigma)


def adm_statistics(path: Path, features: int) -> GaussianStats | None:
    """The precomputed ``mu``/``sigma`` of an ADM reference batch (TensorFlow Inception), or None if it has none."""
    with np.load(path, allow_pickle=False) as z:
        if "mu" not in z or "sigma" not in z:
            return None
        stats = _gaussian_arrays(z["mu"], z["sigma"], f"--reference-batch {path}")
    if len(stats.mu) != features:
        raise ArtifactError(f"--reference-batch {path}: mu has {len(stats.mu)} dimensions, not the {features} of Inception pool_3")
    return stats


@dataclass(frozen=True)
class ReferenceStats:
    """What a ``--reference-stats`` file keeps of a reference batch: its Gaussian (FID), its pool_3
    features (precision/recall need them), the network that made them and where the images came from."""

    stats: GaussianStats
    features: np.ndarray  # (N, 2048) float32
    inception_sha256: str
    source: str  # file name of the reference batch
    source_bytes: int
    resolution: tuple[int, int]

    def save(self, path: Path) -> Path:
        from ditrt.contracts.files import atomic_write

        meta = {"format": STATS_FORMAT, "inception_sha256": self.inception_sha256, "source": self.source,
                "source_bytes": self.source_bytes, "resolution": list(self.resolution)}  # fmt: skip

        def write(tmp: Path):
            buf = io.BytesIO()
            np.savez(buf, mu=self.stats.mu, sigma=self.stats.sigma, features=self.features, meta=np.array(json.dumps(meta)))
            tmp.write_bytes(buf.getvalue())

        return atomic_write(Path(path), write)

    @classmethod
    def load(cls, path: Path, *, inception_sha256: str) -> ReferenceStats:
        """Read a file :meth:`save` wrote; statistics of another network file are refused."""
        fix = "delete it to recompute it from --reference-batch"
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                mu, sigma, features = z["mu"], z["sigma"], z["features"]
        except (KeyError, ValueError, OSError, json.JSONDecodeError) as e:
            raise ArtifactError(f"--reference-stats {path} is not a ditrt reference statistics file ({e}); {fix}") from None
        if meta.get("format") != STATS_FORMAT:
            raise ArtifactError(f"--reference-stats {path} has format {meta.get('format')!r}, not {STATS_FORMAT}; {fix}")
        stats = _gaussian_arrays(mu, sigma, f"--reference-stats {path}")
        if features.ndim != 2 or features.shape[1] != len(stats.mu) or len(features) < 2:
            raise ArtifactError(f"--reference-stats {path}: features {features.shape} do not match mu {stats.mu.shape}; {fix}")
        if meta["inception_sha256"] != inception_sha256:
            raise ArtifactError(f"--reference-stats {path} was computed with another Inception file (sha256 {meta['inception_sha256'][:12]}...); {fix}")
        return cls(stats, features, meta["inception_sha256"], meta["source"], int(meta["source_bytes"]), tuple(meta["resolution"]))
