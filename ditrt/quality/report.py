"""Evaluating sample sets into plain dicts (the JSON the CLI prints).

Digits samples (N, 1, 8, 8) get the built-in evaluator (FD, class accuracy); RGB images (ImageNet
samples decoded by the VAE, or an ADM ``arr_0`` batch) get the Inception metrics (FID, IS,
precision/recall) from a local network file; both get paired PSNR against ``--reference``. A metric
that cannot be measured is None, with its reason under ``absent``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ditrt import distributed
from ditrt.contracts.errors import ArtifactError, ConfigError, InputError
from ditrt.quality import metrics

ALWAYS_ABSENT = {
    "sfid": "sFID needs Inception's mixed_6/conv spatial features, which the TorchScript network does not return "
    "(it gives pool_3 features or class probabilities only)",
    "lpips": "LPIPS needs its VGG/AlexNet weights through torchvision, which cannot be imported next to this CPU torch, "
    "and no maintained package works without it or without downloads",
}


def evaluate_samples(samples: Path, reference: Path | None = None, *, inception: Path | None = None,
                     reference_batch: Path | None = None, reference_stats: Path | None = None, adm_stats: bool = False,
                     device: str = "cpu", batch_size: int = 100, world=distributed.SINGLE, progress: bool = False) -> dict | None:  # fmt: skip
    """The metrics of a samples.npz (or ADM .npz) as a dict; None on every rank but the main one of a torchrun world.

    Digits: ``{"fd", "fd_floor", "class_accuracy", "psnr_db", "num_samples", ...}``. RGB images:
    ``{"fid", "inception_score", "precision", "recall", "sfid", "lpips", "psnr_db", ..., "absent"}``,
    the network ``inception`` (or ``$DITRT_INCEPTION``) against ``reference_batch`` (see
    :func:`evaluate_inception`)."""
    from ditrt.quality.image_sets import open_samples

    images = open_samples(samples)
    inception_options = inception is not None or reference_batch is not None or reference_stats is not None or adm_stats
    if images.channels == 1 and images.layout == "ditrt" and not inception_options:
        result = _digits(Path(samples), reference)
        return result if world.is_main else None
    return evaluate_inception(images, reference, inception=inception, reference_batch=reference_batch, reference_stats=reference_stats,
                              adm_stats=adm_stats, device=device, batch_size=batch_size, world=world, progress=progress)  # fmt: skip


def _digits(samples: Path, reference: Path | None) -> dict:
    from ditrt.diffusion.sample_set import SampleSet

    s = SampleSet.load(samples)
    metrics.check_finite(s.data, str(samples))
    out = {
        "evaluator": "digits",
        "fd": metrics.fd_to_real(s.data),
        "fd_floor": metrics.fd_floor(),
        "class_accuracy": metrics.class_accuracy(s.data, s.labels),
        "psnr_db": None,
        "num_samples": len(s.labels),
        "absent": {},
    }
    if reference is not None:
        _check_paired(samples, reference)
        out["psnr_db"] = _paired_psnr(samples, reference)
    else:
        out["absent"]["psnr_db"] = "no --reference sample set (paired PSNR compares two sets made with the same seeds and labels)"
    return out


def _check_paired(samples: Path, reference: Path) -> None:
    """Refuse, before any work, a --reference that was not made with the same seeds and labels."""
    from ditrt.quality.image_sets import npy_member, npz_names

    names = npz_names(reference, what="--reference", fix="create it with `ditrt sample --out DIR`")
    mine = npz_names(samples, what="SAMPLES", fix="create it with `ditrt sample --out DIR`")
    if not {"labels", "seeds"} <= names or not {"labels", "seeds"} <= mine:
        raise ConfigError(f"paired PSNR needs two ditrt samples.npz (with seeds and labels); {samples} or {reference} is not one")
    for key in ("seeds", "labels"):
        if not np.array_equal(np.asarray(npy_member(reference, key)), np.asarray(npy_member(samples, key))):
            raise InputError(f"{reference} was not made with the same seeds and labels as {samples}; paired PSNR needs both equal")


def _paired_psnr(samples: Path, reference: Path) -> float:
    from ditrt.diffusion.sample_set import SampleSet

    s, r = SampleSet.load(samples), SampleSet.load(reference)
    if r.kind != s.kind:
        raise InputError(f"{reference} holds {r.kind} and {samples} {s.kind}; paired PSNR compares like with like")
    metrics.check_finite(r.data, str(reference))
    return metrics.paired_psnr(r.data, s.data)


def evaluate_inception(images, reference: Path | None = None, *, inception: Path | None = None, reference_batch: Path | None = None,
                       reference_stats: Path | None = None, adm_stats: bool = False, device: str = "cpu", batch_size: int = 100,
                       world=distributed.SINGLE, progress: bool = False) -> dict | None:  # fmt: skip
    """FID, IS and precision/recall of an :class:`~ditrt.quality.image_sets.ImageSet` of RGB images.

    Every input is checked on every rank before the network runs. Each rank extracts the features
    of its chunks (:func:`ditrt.quality.inception.inception_outputs`), the main rank computes the
    metrics. The reference statistics are computed from ``reference_batch``'s images with the same
    network, or read from ``reference_stats`` if that file exists (else written there), or, with
    ``adm_stats``, FID uses the batch's precomputed TensorFlow ``mu``/``sigma``."""
    from ditrt.contracts.files import check_writable
    from ditrt.quality import fid, inception_score, precision_recall
    from ditrt.quality.image_sets import open_reference_batch
    from ditrt.quality.inception import FEATURES, FIX, inception_outputs, inception_path, load_inception

    if images.channels != 3:
        hint = "; digits samples are measured without these options" if images.channels == 1 and images.layout == "ditrt" else ""
        raise InputError(f"{images.path} holds {images.channels}-channel images; the Inception metrics measure RGB (3-channel) images{hint}")
    if len(images) < 2:
        raise InputError(f"{images.path} holds {len(images)} image; FID and IS need at least 2, sample more")
    if batch_size <= 0:
        raise ConfigError(f"--batch-size must be a positive number of images, got {batch_size}")
    ref = open_reference_batch(reference_batch) if reference_batch is not None else None
    if ref is not None:
        if ref.channels != images.channels:
            raise InputError(f"--reference-batch {ref.path} holds {ref.channels}-channel images and {images.path} {images.channels}-channel; pass an RGB ADM batch")
        if len(ref) < 2:
            raise InputError(f"--reference-batch {ref.path} holds {len(ref)} image; it needs at least 2")
    if adm_stats and ref is None:
        raise ConfigError("--adm-stats uses the precomputed mu/sigma of the reference batch; pass --reference-batch ADM.npz")
    stats_exist = reference_stats is not None and Path(reference_stats).is_file()
    if reference_stats is not None and not stats_exist:
        if ref is None:
            raise ConfigError(f"--reference-stats {reference_stats} does not exist and there is no --reference-batch to compute it from; pass one")
        check_writable(reference_stats, what="--reference-stats")
    if reference is not None:
        _check_paired(images.path, reference)
    path = inception_path(inception)
    if path is None and (reference is None or ref is not None or reference_stats is not None):
        raise ConfigError(f"{images.path} holds RGB images: FID, IS and precision/recall need the Inception network; {FIX}")
    net = load_inception(path, device) if path is not None else None
    adm = None
    if adm_stats:
        adm = fid.adm_statistics(ref.path, FEATURES)
        if adm is None:
            raise ArtifactError(f"--reference-batch {ref.path} has no precomputed mu/sigma for --adm-stats; drop --adm-stats to compute them")
    loaded = fid.ReferenceStats.load(reference_stats, inception_sha256=net.sha256) if stats_exist else None
    if loaded is not None and ref is not None and (loaded.source, loaded.source_bytes) != (ref.path.name, ref.path.stat().st_size):
        raise ArtifactError(f"--reference-stats {reference_stats} was computed from {loaded.source}, not {ref.path}; delete it to recompute it")
    _check_finite(images, batch_size, world)

    out = None if net is None else inception_outputs(net, images, world=world, batch_size=batch_size, progress=progress, what="samples")
    ref_features = ref_gauss = None
    if loaded is not None:
        ref_features, ref_gauss = loaded.features, loaded.stats
    elif ref is not None:
        ref_features = inception_outputs(net, ref, world=world, batch_size=batch_size, progress=progress, what="reference images").pool
        ref_gauss = fid.GaussianStats.of(ref_features)
    if not world.is_main:
        return None

    result = {
        "evaluator": "inception",
        "num_samples": len(images),
        "resolution": list(images.resolution),
        "inception": None if net is None else str(net.path),
        "inception_sha256": None if net is None else net.sha256,
        "reference_batch": None if ref is None else str(ref.path),
        "num_reference": None if ref_features is None else len(ref_features),
        "reference_resolution": None if ref is None else list(ref.resolution),
        "reference_statistics": None,
        "fid": None, "inception_score": None, "inception_score_splits": None, "precision": None, "recall": None,
        "sfid": None, "lpips": None, "psnr_db": None,
        "world_size": world.size,
        "absent": dict(ALWAYS_ABSENT),
        "notes": [],
    }  # fmt: skip
    absent, notes = result["absent"], result["notes"]
    if net is None:
        for key in ("fid", "inception_score", "precision", "recall"):
            absent[key] = f"no Inception network: {FIX}"
    else:
        score = inception_score.inception_score(out.probs)
        result["inception_score"], result["inception_score_splits"] = score.score, score.splits
        if len(images) < inception_score.SPLIT:
            notes.append(f"IS over one split of {len(images)} images (ADM splits by {inception_score.SPLIT}): not comparable to 50k scores")
        if ref_gauss is None:
            for key in ("fid", "precision", "recall"):
                absent[key] = "no --reference-batch or --reference-stats to compare with"
        else:
            if adm is not None:
                result["reference_statistics"] = "precomputed mu/sigma of the reference batch (ADM's TensorFlow Inception)"
            elif loaded is not None:
                result["reference_statistics"] = f"read from {reference_stats}"
            else:
                result["reference_statistics"] = "computed from the reference batch with the same network"
            result["fid"] = fid.frechet_distance(fid.GaussianStats.of(out.pool), adm if adm is not None else ref_gauss)
            if len(images) <= precision_recall.K or len(ref_features) <= precision_recall.K:
                absent["precision"] = absent["recall"] = f"precision/recall need more than {precision_recall.K} images in each set"
            else:
                result["precision"], result["recall"] = precision_recall.precision_recall(ref_features, out.pool, device=device)
            if ref is not None and images.resolution != ref.resolution:
                notes.append(f"resolutions differ ({_hw(images.resolution)} vs {_hw(ref.resolution)}): the network resizes both to 299")
            if len(images) < FEATURES:
                notes.append(f"FID of {len(images)} < {FEATURES} samples is biased upwards: compare FIDs only at equal sample counts")
    if reference is not None:
        result["psnr_db"] = _paired_psnr(images.path, reference)
    else:
        absent["psnr_db"] = "no --reference sample set (paired PSNR compares two sets made with the same seeds and labels)"
    if reference_stats is not None and loaded is None and ref is not None:
        fid.ReferenceStats(ref_gauss, ref_features, net.sha256, ref.path.name, ref.path.stat().st_size, ref.resolution).save(reference_stats)
    return result


def _check_finite(images, batch_size: int, world) -> None:
    """NaN/inf pixels refused on every rank at once: each counts its own chunks, the counts are summed."""
    from ditrt.quality.inception import CHUNK_BATCHES

    plan = distributed.chunk_ranges(len(images), CHUNK_BATCHES * batch_size)
    counts = torch.zeros(2, dtype=torch.float64)
    for k in distributed.my_chunks(len(plan), world):
        counts += torch.tensor(images.nonfinite(plan[k]), dtype=torch.float64)
    if world.distributed and world.backend == "nccl":
        counts = counts.cuda()
    bad, rows = (int(v) for v in distributed.all_reduce_sum(counts, world).cpu())
    if bad:
        raise InputError(f"{images.path} holds {bad} NaN/inf values (in {rows} of {len(images)} samples); re-sample them (the model or recipe diverged)")


def _hw(resolution) -> str:
    return "x".join(str(v) for v in resolution)
