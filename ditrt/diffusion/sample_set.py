"""Sample sets: generating them with any denoiser, and the ``samples.npz`` artifact."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ditrt.contracts.errors import ArtifactError, InputError
from ditrt.diffusion.sampler import SamplerConfig, sample
from ditrt.diffusion.schedule import make_schedule


@dataclass
class SampleSet:
    """``data`` is (N, C, H, W) float32: images in [-1, 1] (``kind="images"``) or VAE latents."""

    data: np.ndarray
    labels: np.ndarray
    seeds: np.ndarray
    kind: str = "images"
    settings: dict = field(default_factory=dict)

    def save(self, path: Path) -> Path:
        from ditrt.contracts.files import atomic_write

        def write(tmp: Path):
            buf = io.BytesIO()
            np.savez(buf, **{self.kind: self.data}, labels=self.labels, seeds=self.seeds, settings=np.array(json.dumps(self.settings)))
            tmp.write_bytes(buf.getvalue())

        return atomic_write(Path(path), write)

    @classmethod
    def load(cls, path: Path) -> SampleSet:
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                kind = "images" if "images" in z else "latents"
                return cls(z[kind], z["labels"], z["seeds"], kind, json.loads(str(z["settings"])))
        except FileNotFoundError:
            raise ArtifactError(f"{path} does not exist; create it with `ditrt sample --out DIR`") from None
        except (KeyError, ValueError, OSError) as e:
            raise ArtifactError(f"{path} is not a ditrt samples.npz ({e}); create it with `ditrt sample`") from None


def default_labels(num: int, num_classes: int, classes: list[int] | None = None) -> list[int]:
    """``num`` labels cycling through ``classes`` (all classes when None)."""
    if num <= 0:
        raise InputError(f"--num must be positive, got {num}")
    classes = list(range(num_classes)) if classes is None else classes
    if not classes:
        raise InputError("no classes given; pass --classes such as 0,3,7")
    for c in classes:
        if not 0 <= c < num_classes:
            raise InputError(f"class id {c} is out of range: this model has classes 0..{num_classes - 1}")
    return [classes[i % len(classes)] for i in range(num)]


def generate(
    denoiser,
    config: SamplerConfig,
    labels: list[int],
    seeds: list[int],
    *,
    num_classes: int,
    image_shape: tuple[int, int, int],
    device: str = "cpu",
    batch_size: int = 256,
    progress: bool = False,
    noise: torch.Tensor | None = None,
    step_noise=None,
) -> np.ndarray:
    """Samples for each (label, seed), in batches; batching does not change any sample.

    ``noise`` (N, C, H, W) and ``step_noise`` ((S, N, C, H, W) or ``k -> (N, C, H, W)``) replace the
    seeded noise as in :func:`ditrt.diffusion.sampler.sample`; each batch gets its rows."""
    if batch_size <= 0:
        raise InputError(f"--batch-size must be a positive number of images, got {batch_size}")
    out = []
    chunks = range(0, len(labels), batch_size)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        steps = len(chunks) * make_schedule(config.steps).num_steps
        bar = tqdm(total=steps, desc=f"sampling {len(labels)} images", unit="step")
    for s in chunks:
        rows = slice(s, s + batch_size)
        x = sample(
            denoiser, config, labels[rows], seeds[rows], num_classes=num_classes,
            image_shape=image_shape, device=device, on_step=(lambda i, n: bar.update(1)) if bar else None,
            noise=None if noise is None else noise[rows], step_noise=_rows(step_noise, rows),
        )  # fmt: skip
        out.append(x.float().cpu())
    if bar:
        bar.close()
    return torch.cat(out).numpy()


def _rows(step_noise, rows: slice):
    """The batch ``rows`` of per-step noise (a (S, N, ...) tensor or a callable ``k -> (N, ...)``)."""
    if step_noise is None:
        return None
    if callable(step_noise):
        return lambda k: step_noise(k)[rows]
    return step_noise[:, rows]
