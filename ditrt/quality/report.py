"""Evaluating sample sets into plain dicts (the JSON the CLI prints)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ditrt.contracts.errors import InputError
from ditrt.quality import metrics


def evaluate_samples(samples: Path, reference: Path | None = None) -> dict:
    """``{"fd", "fd_floor", "class_accuracy", "psnr_db", "num_samples"}`` for a samples.npz."""
    from ditrt.diffusion.sample_set import SampleSet

    s = SampleSet.load(samples)
    metrics.check_finite(s.data, str(samples))
    if s.kind != "images":
        raise InputError(f"{samples} holds latents, not images; sample with --vae DIR to decode them first")
    out = {
        "fd": metrics.fd_to_real(s.data),
        "fd_floor": metrics.fd_floor(),
        "class_accuracy": metrics.class_accuracy(s.data, s.labels),
        "psnr_db": None,
        "num_samples": len(s.labels),
    }
    if reference is not None:
        r = SampleSet.load(reference)
        metrics.check_finite(r.data, str(reference))
        if not (np.array_equal(r.seeds, s.seeds) and np.array_equal(r.labels, s.labels)):
            raise InputError(f"{reference} was not made with the same seeds and labels as {samples}; paired PSNR needs both equal")
        out["psnr_db"] = metrics.paired_psnr(r.data, s.data)
    return out
