"""The image sets the Inception evaluator reads, memory-mapped: nothing is loaded whole.

Two formats, told apart by their arrays:

- ditrt's ``samples.npz`` (:class:`ditrt.diffusion.sample_set.SampleSet`): ``images`` (N, C, H, W)
  float in [-1, 1]. A set of ``latents`` is refused: decode it with ``ditrt sample --vae``.
- the ADM evaluator's batches (openai/guided-diffusion ``evaluations/``; DiT's ``sample_ddp.py``
  writes its samples this way): ``arr_0`` (N, H, W, 3) uint8, and for reference batches such as
  ``VIRTUAL_imagenet256_labeled.npz`` also ``mu``/``sigma`` (and the spatial ``mu_s``/``sigma_s``).

The network takes uint8 pixels; float images become uint8 by DiT's own conversion
(:func:`ditrt.diffusion.sample_set.adm_uint8`, which also writes ditrt's ADM npz), so a ditrt
sample set and the ADM batch made from it are the same input.
"""

from __future__ import annotations

import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ditrt.contracts.errors import ArtifactError, InputError

_LOCAL_HEADER = b"PK\x03\x04"


def npy_member(path: Path, name: str) -> np.ndarray:
    """Array ``name`` of the ``.npz`` at ``path``: memory-mapped when stored uncompressed (``np.savez``),
    read whole when compressed (``np.savez_compressed``). Object arrays (pickles) are refused."""
    try:
        with zipfile.ZipFile(path) as zf:
            info = zf.getinfo(f"{name}.npy")
            with zf.open(info) as member:
                if info.compress_type != zipfile.ZIP_STORED:
                    return np.lib.format.read_array(member, allow_pickle=False)
                version = np.lib.format.read_magic(member)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read_header(member)
                header_bytes = member.tell()
        with open(path, "rb") as f:  # the member's bytes start after its local header (name and extra field)
            f.seek(info.header_offset)
            local = f.read(30)
        if local[:4] != _LOCAL_HEADER:
            raise ArtifactError(f"{path} has a damaged zip entry {name}.npy; write the file again")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        offset = info.header_offset + 30 + name_len + extra_len + header_bytes
    except (zipfile.BadZipFile, EOFError) as e:
        raise ArtifactError(f"{path} is not a readable .npz ({e}); write it with numpy.savez") from None
    except ValueError as e:  # numpy's header checks (object arrays among them)
        raise ArtifactError(f"{path}: {name}.npy cannot be read without unpickling ({e}); save plain numeric arrays") from None
    if dtype.hasobject:
        raise ArtifactError(f"{path}: {name}.npy holds Python objects; save plain numeric arrays")
    if not int(np.prod(shape)):
        return np.empty(shape, dtype)
    try:
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")
    except ValueError:
        raise ArtifactError(f"{path} is truncated ({name}.npy is shorter than its header says); write it again") from None


def npz_names(path: Path, *, what: str, fix: str) -> set[str]:
    """The array names of an ``.npz``; a missing or non-zip file is one line naming ``what`` and ``fix``."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{what} {path} does not exist; {fix}")
    try:
        with zipfile.ZipFile(path) as zf:
            return {n[:-4] for n in zf.namelist() if n.endswith(".npy")}
    except zipfile.BadZipFile:
        raise ArtifactError(f"{what} {path} is not an .npz file; {fix}") from None


@dataclass(frozen=True)
class ImageSet:
    """``pixels``: (N, C, H, W) float in [-1, 1] (``layout="ditrt"``) or (N, H, W, C) uint8 (``"adm"``)."""

    path: Path
    pixels: np.ndarray
    layout: str

    def __len__(self) -> int:
        return len(self.pixels)

    @property
    def channels(self) -> int:
        return int(self.pixels.shape[1] if self.layout == "ditrt" else self.pixels.shape[3])

    @property
    def resolution(self) -> tuple[int, int]:
        h, w = self.pixels.shape[2:4] if self.layout == "ditrt" else self.pixels.shape[1:3]
        return int(h), int(w)

    def uint8(self, rows: range) -> np.ndarray:
        """Images ``rows`` as (n, C, H, W) uint8, the network's input."""
        from ditrt.diffusion.sample_set import adm_uint8

        x = np.asarray(self.pixels[rows.start : rows.stop])
        return np.ascontiguousarray((adm_uint8(x) if self.layout == "ditrt" else x).transpose(0, 3, 1, 2))

    def nonfinite(self, rows: range) -> tuple[int, int]:
        """(NaN/inf values, images holding any) among ``rows``; uint8 batches have none."""
        if self.layout != "ditrt":
            return 0, 0
        bad = ~np.isfinite(np.asarray(self.pixels[rows.start : rows.stop]).reshape(len(rows), -1))
        return int(bad.sum()), int(bad.any(1).sum())


def open_samples(path: Path) -> ImageSet:
    """A sample set to evaluate: ditrt's ``samples.npz`` (images, not latents) or an ADM ``arr_0`` batch."""
    names = npz_names(path, what="SAMPLES", fix="create it with `ditrt sample --out DIR` (or pass an ADM .npz with arr_0)")
    if "latents" in names and "images" not in names:
        raise InputError(f"{path} holds VAE latents, not images; decode them by sampling with `ditrt sample ... --vae DIR`")
    if "images" in names:
        pixels = npy_member(path, "images")
        if pixels.ndim != 4 or not np.issubdtype(pixels.dtype, np.floating):
            raise ArtifactError(f"{path}: images must be (N, C, H, W) floats in [-1, 1], got {pixels.dtype} {pixels.shape}; write it with `ditrt sample`")
        return ImageSet(Path(path), pixels, "ditrt")
    if "arr_0" in names:
        return _adm_images(path, "SAMPLES")
    raise ArtifactError(f"{path} has neither images (ditrt samples.npz) nor arr_0 (ADM batch) but {sorted(names)}; create it with `ditrt sample`")


def open_reference_batch(path: Path) -> ImageSet:
    """The ADM reference batch (``arr_0`` uint8 (N, H, W, 3)) such as ``VIRTUAL_imagenet256_labeled.npz``."""
    names = npz_names(path, what="--reference-batch", fix="pass the ADM reference batch .npz (e.g. VIRTUAL_imagenet256_labeled.npz)")
    if "arr_0" not in names:
        raise ArtifactError(f"--reference-batch {path} has no arr_0 image array ({sorted(names)}); pass an ADM reference batch .npz")
    return _adm_images(path, "--reference-batch")


def _adm_images(path: Path, what: str) -> ImageSet:
    pixels = npy_member(path, "arr_0")
    if pixels.dtype != np.uint8 or pixels.ndim != 4:
        raise ArtifactError(f"{what} {path}: arr_0 must be uint8 (N, H, W, 3) images as the ADM evaluator reads, got {pixels.dtype} {pixels.shape}")
    return ImageSet(Path(path), pixels, "adm")
