"""Sample sets: generating them with any denoiser, the ``samples.npz`` artifact, and the ADM
evaluator's npz (``arr_0`` uint8 images) that FID on ImageNet is computed from.

npz files are written by :func:`write_npz`: uncompressed, atomically, and streamed from parts where
an array is too large to hold (50 000 decoded 256x256 images are 39 GB in float32).
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable, Iterable
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
        """Write ``samples.npz`` atomically; ``data`` may be an :class:`ArrayStream` (a set too large to hold)."""
        members = {"labels": np.asarray(self.labels), "seeds": np.asarray(self.seeds), "settings": np.array(json.dumps(self.settings))}
        return write_npz(path, {self.kind: self.data, **members})

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
    on_step: Callable[[int, int], None] | None = None,
    noise: torch.Tensor | None = None,
    step_noise=None,
) -> np.ndarray:
    """Samples for each (label, seed), in batches; batching does not change any sample.

    ``on_step(k, n)`` is called after each sampling step of each batch (for a caller's progress bar).

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

    def step(k: int, n: int) -> None:
        if bar is not None:
            bar.update(1)
        if on_step is not None:
            on_step(k, n)

    for s in chunks:
        rows = slice(s, s + batch_size)
        x = sample(
            denoiser, config, labels[rows], seeds[rows], num_classes=num_classes,
            image_shape=image_shape, device=device, on_step=step if bar is not None or on_step is not None else None,
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


def preview_indices(labels, *, classes: int = 10, per_class: int = 10) -> list[int]:
    """The samples a picture of a large set shows: up to ``per_class`` of each of its first ``classes``
    classes (in order of appearance), so a grid of 50 000 ImageNet samples stays a 10 x 10 grid."""
    shown: dict[int, int] = {}
    out = []
    for i, c in enumerate(int(v) for v in np.asarray(labels)):
        if c not in shown and len(shown) == classes:
            continue
        if shown.get(c, 0) < per_class:
            shown[c] = shown.get(c, 0) + 1
            out.append(i)
    return out


def adm_uint8(images: np.ndarray) -> np.ndarray:
    """(N, 3, H, W) images in [-1, 1] -> (N, H, W, 3) uint8 exactly as DiT's sample_ddp.py makes the
    samples it hands to the ADM evaluator: ``clamp(127.5 * x + 128, 0, 255)`` cast (truncated) to uint8.

    Not :func:`ditrt.quality.images.to_uint8` (which rounds, for pictures): DiT's FIDs are measured on
    this conversion, and a reproduction has to use the same one."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise InputError(f"the ADM evaluator reads RGB images (N, 3, H, W), got shape {tuple(images.shape)}")
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    return torch.clamp(127.5 * x + 128.0, 0, 255).permute(0, 2, 3, 1).to(torch.uint8).numpy()


@dataclass(frozen=True)
class ArrayStream:
    """An array of ``shape`` and ``dtype`` that :func:`write_npz` writes from ``parts()``: consecutive
    slices along the first axis, so the whole never has to be in memory."""

    shape: tuple[int, ...]
    dtype: np.dtype
    parts: Callable[[], Iterable[np.ndarray]]


def write_adm_npz(path: Path, images: ArrayStream, labels) -> Path:
    """The ADM evaluator's sample batch: ``arr_0`` (N, H, W, 3) uint8 (streamed from ``images``, parts of
    (n, 3, H, W) floats in [-1, 1]) and the class labels as ``arr_1``, where guided-diffusion's own
    sampling scripts put them (its evaluator reads ``arr_0`` only)."""
    n, c, h, w = images.shape
    if c != 3:
        raise InputError(f"the ADM evaluator reads RGB images, these have {c} channels")
    rgb = ArrayStream((n, h, w, 3), np.uint8, lambda: (adm_uint8(p) for p in images.parts()))
    return write_npz(path, {"arr_0": rgb, "arr_1": np.asarray(labels, dtype=np.int64)})


def write_npz(path: Path, members: dict) -> Path:
    """Write ``members`` (name -> array or :class:`ArrayStream`) as an uncompressed ``.npz`` that
    ``np.load`` reads as usual (``allow_pickle=False``: no object arrays), atomically."""
    from ditrt.contracts.files import atomic_write

    def write(tmp: Path):
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, value in members.items():
                with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                    if isinstance(value, ArrayStream):
                        _write_stream(f, name, value)
                    else:
                        np.lib.format.write_array(f, np.asanyarray(value), allow_pickle=False)

    return atomic_write(Path(path), write)


def _write_stream(f, name: str, stream: ArrayStream) -> None:
    dtype = np.dtype(stream.dtype)
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(stream.shape)}
    np.lib.format.write_array_header_1_0(f, header)
    rows = 0
    for part in stream.parts():
        if part.dtype != dtype or tuple(part.shape[1:]) != tuple(stream.shape[1:]):
            raise InputError(f"npz member {name}: a part of shape {part.shape} {part.dtype} does not fit {stream.shape} {dtype}")
        f.write(np.ascontiguousarray(part).data)
        rows += len(part)
    if rows != stream.shape[0]:
        raise InputError(f"npz member {name}: its parts hold {rows} rows, {stream.shape[0]} were announced")
