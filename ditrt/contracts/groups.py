"""The timestep-group manifest: which graph (or engine) serves which range of timesteps.

A recipe calibrated with K timestep groups of activation scales exports K graphs that share their
weights (``<stem>.g<i>.onnx``) and a manifest ``<stem>.groups.json``; ``ditrt build`` turns that
into K engines (``<stem>.g<i>.plan``) and an engine manifest of the same format. The runtime reads
either and picks the file of each call's timestep group (:func:`ditrt.contracts.recipe.timestep_group`).

    {"format": "ditrt-timestep-groups", "kind": "onnx" | "tensorrt",
     "edges": [descending timesteps, K - 1 of them], "graphs": [K file names beside the manifest]}
"""

from __future__ import annotations

import json
from pathlib import Path

from ditrt.contracts.errors import ArtifactError, ConfigError
from ditrt.contracts.files import atomic_write

GROUPS_FORMAT = "ditrt-timestep-groups"
SUFFIX = ".groups.json"
KINDS = {"onnx": ("ONNX graphs", "`ditrt export` with the recipe"), "tensorrt": ("TensorRT engines", "`ditrt build --onnx M.groups.json`")}


def is_group_manifest(path) -> bool:
    return str(path).endswith(SUFFIX)


def group_stem(path) -> Path:
    """``out/m.onnx``, ``out/m.plan`` or ``out/m.groups.json`` -> ``out/m``."""
    path = Path(path)
    name = path.name[: -len(SUFFIX)] if is_group_manifest(path) else path.stem
    return path.with_name(name)


def manifest_path(path) -> Path:
    return Path(f"{group_stem(path)}{SUFFIX}")


def group_file(path, group: int, suffix: str) -> Path:
    """The file of ``group`` beside ``path``'s manifest: ``<stem>.g<group><suffix>``."""
    return Path(f"{group_stem(path)}.g{group}{suffix}")


def group_graph_path(path, group: int) -> Path:
    return group_file(path, group, ".onnx")


def write_manifest(path, edges, files, kind: str) -> Path:
    """Write the manifest for ``files`` (all beside it) atomically; returns its path."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}")
    out = manifest_path(path)
    files = [Path(f) for f in files]
    if len(files) != len(edges) + 1 or any(f.parent.resolve() != out.parent.resolve() for f in files):
        raise ValueError("a manifest lists len(edges) + 1 files, all in the manifest's folder")
    manifest = {"format": GROUPS_FORMAT, "kind": kind, "edges": [float(e) for e in edges], "graphs": [f.name for f in files]}
    atomic_write(out, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=2) + "\n"))
    return out


#: single-file artifacts and the kind of manifest each one stands for
SINGLE_SUFFIXES = {".onnx": "onnx", ".plan": "tensorrt", ".engine": "tensorrt"}


def read_artifact(path) -> tuple[str, tuple[float, ...], list[Path]]:
    """``(kind, edges, files)`` of a graph or engine artifact: a ``.groups.json`` manifest as written,
    a single ``.onnx`` as ``("onnx", (), [path])``, a ``.plan``/``.engine`` as ``("tensorrt", (), [path])``.

    A single file is a one-group manifest, so every reader has one path for both."""
    path = Path(path)
    if is_group_manifest(path):
        return _read(path)
    kind = SINGLE_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise ConfigError(f"{path} is not an ONNX graph (.onnx), an engine (.plan, .engine) or a {SUFFIX} manifest; pass one of those")
    if not path.is_file():
        raise ArtifactError(f"{path} does not exist; create it with {'`ditrt export`' if kind == 'onnx' else '`ditrt build`'}")
    return kind, (), [path]


def read_manifest(path, kind: str | None = None) -> tuple[tuple[float, ...], list[Path]]:
    """The edges and the file paths (resolved beside the manifest) of a groups manifest.

    With ``kind``, a manifest of the other kind is refused with what to pass instead."""
    found, edges, files = _read(Path(path))
    if kind is not None and found != kind:
        what = KINDS.get(found, (found,))[0]
        want, make = KINDS[kind]
        raise ConfigError(f"{path} lists {what}, not {want}; pass it where {what} go, or make {want} with {make}")
    return edges, files


def _read(path: Path) -> tuple[str, tuple[float, ...], list[Path]]:
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"cannot read timestep-group manifest {path} ({e}); re-run `ditrt export`") from None
    if not isinstance(d, dict) or d.get("format") != GROUPS_FORMAT or len(d.get("graphs", ())) != len(d.get("edges", ())) + 1:
        raise ArtifactError(f"{path} is not a ditrt timestep-group manifest; re-run `ditrt export` with the recipe")
    found = d.get("kind", "onnx")  # manifests from before engines had groups list graphs
    if found not in KINDS:
        raise ArtifactError(f"{path} lists files of the unknown kind {found!r} (known: {', '.join(KINDS)}); re-run `ditrt export`")
    files = [path.parent / g for g in d["graphs"]]
    missing = [f for f in files if not f.exists()]
    if missing:
        raise ArtifactError(f"{missing[0]} listed in {path} is missing; re-run {KINDS[found][1]}")
    return found, tuple(float(e) for e in d["edges"]), files
