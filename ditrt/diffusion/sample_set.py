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
) -> np.ndarray:
    """Samples for each (label, seed), in batches; batching does not change any sample."""
    out = []
    chunks = range(0, len(labels), batch_size)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        steps = len(chunks) * make_schedule(config.steps).num_steps
        bar = tqdm(total=steps, desc=f"sampling {len(labels)} images", unit="step")
    for s in chunks:
        x = sample(
            denoiser, config, labels[s : s + batch_size], seeds[s : s + batch_size], num_classes=num_classes,
            image_shape=image_shape, device=device, on_step=(lambda i, n: bar.update(1)) if bar else None,
        )  # fmt: skip
        out.append(x.float().cpu())
    if bar:
        bar.close()
    return torch.cat(out).numpy()
