"""Writing artifacts atomically, and the hashes that tie one artifact to another.

Every file ditrt writes goes through :func:`atomic_write` (a temp file beside the target, then a
rename), so an interrupted command never leaves a half-written artifact. Hashes: of a model's
weights (:func:`state_dict_hash`, what a recipe records), of named tensors (:func:`tensors_sha256`,
what a graph records of its recipe), of files (:func:`file_sha256`) and of an ONNX graph with its
external data (:func:`onnx_sha256`, what an engine sidecar records).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ditrt.contracts.errors import ArtifactError, ConfigError


def check_writable(path: Path, *, what: str = "--out", folder: bool = False) -> Path:
    """Refuse, before any work, an output path that cannot be written: a parent that is a file,
    a file where a folder is wanted (or the other way round), or a read-only location."""
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {path} is a file, but a folder is written there; pass a folder path")
    if not folder and path.is_dir():
        raise ConfigError(f"{what} {path} is a folder, but a file is written there; pass a file path such as {path / 'model.onnx'}")
    parent = path if folder else path.parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{what} {path} lies under {probe}, which is a file, not a folder; choose another output path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path} cannot be written ({probe} is not writable); choose another output path")
    return path


def atomic_write(path: Path, write) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``: no half-written file is ever left,
    also when ``write`` raises or the process is interrupted (KeyboardInterrupt included)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


@contextmanager
def output_folder(out_dir: Path):
    """``with output_folder(out):`` creates ``out`` for a command that writes several files into it; on
    any failure (Ctrl-C included) it removes what the command wrote: the folder (and parents) it
    created, else the paths that were not there before. With :func:`atomic_write` for each file, no
    command leaves a half-written set of outputs."""
    top = out_dir
    while not top.parent.exists():
        top = top.parent
    created = not out_dir.exists()
    if not created:
        top = out_dir
    before = set() if created else set(out_dir.rglob("*"))
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        yield out_dir
    except BaseException:
        if created:
            shutil.rmtree(top, ignore_errors=True)
        else:
            for p in sorted(set(out_dir.rglob("*")) - before, key=lambda p: len(p.parts), reverse=True):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
        raise


def state_dict_hash(model) -> str:
    """sha256 over parameter names, shapes, dtypes and bytes of a torch module: identifies the exact weights."""
    return tensors_sha256(model.state_dict())


def tensors_sha256(tensors: dict, h=None) -> str:
    """sha256 over named tensors in name order (names, shapes, dtypes, bytes); ``h``: a hash to continue."""
    import torch

    h = hashlib.sha256() if h is None else h
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _hash_file(h, path: Path) -> None:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    _hash_file(h, Path(path))
    return h.hexdigest()


def load_onnx_graph(path: Path):
    """The ONNX model at ``path`` without its external data (a DiT-XL/2 graph is read in milliseconds)."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"ONNX file {path} not found; create it with `ditrt export`")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001  protobuf DecodeError and friends: the file is not an ONNX model
        raise ArtifactError(f"{path} is not a readable ONNX model ({type(e).__name__}); re-export it with `ditrt export`") from None


def external_locations(model) -> tuple[str, ...]:
    """The external data files an ONNX model's tensors point to, sorted."""
    from onnx import TensorProto

    locations = set()
    tensors = list(model.graph.initializer)
    for node in model.graph.node:  # Constant nodes can hold external tensors too
        tensors += [a.t for a in node.attribute if a.HasField("t")]
    for t in tensors:
        if t.data_location == TensorProto.EXTERNAL:
            locations.update(e.value for e in t.external_data if e.key == "location")
    return tuple(sorted(locations))


def onnx_sha256(path: Path, external_data: tuple[str, ...] | None = None) -> str:
    """sha256 of the ONNX file, and of its external data files (in name order) when it has any."""
    path = Path(path)
    if external_data is None:
        external_data = external_locations(load_onnx_graph(path))
    if not external_data:
        return file_sha256(path)
    h = hashlib.sha256()
    _hash_file(h, path)
    for name in external_data:
        data = path.parent / name
        if not data.is_file():
            raise ArtifactError(f"the external data file {data} of {path} is missing; re-export the model with `ditrt export`")
        h.update(f"\0{name}\0".encode())
        _hash_file(h, data)
    return h.hexdigest()
