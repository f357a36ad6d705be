"""The engine sidecar ``M.plan.json``: what an engine was built from, by what, for what.

A TensorRT engine only runs on the TensorRT version and the GPU model it was built with, and it
silently goes stale when its ONNX is re-exported. ``ditrt build`` writes this manifest beside
every engine; :func:`verify_sidecar` refuses a mismatch before anything is deserialized, with one
line that names the problem and the rebuild command.

Pure: the TensorRT version and the GPU are arguments, so every refusal is testable without either.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from ditrt import __version__
from ditrt.contracts.errors import ArtifactError
from ditrt.contracts.files import atomic_write, file_sha256, onnx_sha256
from ditrt.contracts.profile import profile_from_dict

SIDECAR_FORMAT = "ditrt-engine"
SIDECAR_VERSION = 1


def sidecar_path(engine_path: Path) -> Path:
    """``M.plan`` -> ``M.plan.json``."""
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def sm(capability) -> str:
    """(9, 0) -> ``"sm_90"``."""
    major, minor = capability
    return f"sm_{major}{minor}"


@dataclass(frozen=True)
class EngineSidecar:
    """Everything an engine depends on. ``profile`` is ``{input: {"min"|"opt"|"max": shape}}``;
    ``build`` is :meth:`BuildConfig.to_dict`; ``precision`` may be ``None`` for foreign graphs."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: tuple[int, int]
    onnx_path: str
    onnx_sha256: str
    engine_sha256: str
    precision: str | None
    profile: dict
    build: dict
    precision_source: str | None = None
    onnx_metadata: dict = field(default_factory=dict)
    ditrt_version: str = __version__
    created: str = ""
    format: str = SIDECAR_FORMAT
    format_version: int = SIDECAR_VERSION

    def __post_init__(self):
        object.__setattr__(self, "compute_capability", tuple(int(v) for v in self.compute_capability))

    @property
    def max_batch(self) -> int | None:
        """The largest engine batch (rows per call, guidance already doubled)."""
        return max((r["max"][0] for r in self.profile.values()), default=None)

    @property
    def min_batch(self) -> int | None:
        """The smallest engine batch (rows per call)."""
        return max((r["min"][0] for r in self.profile.values()), default=None)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["compute_capability"] = list(self.compute_capability)
        return d

    @classmethod
    def from_dict(cls, d: dict, *, source: str = "sidecar") -> EngineSidecar:
        if not isinstance(d, dict) or d.get("format") != SIDECAR_FORMAT:
            raise ArtifactError(f"{source} is not a ditrt engine sidecar; rebuild the engine with `ditrt build`")
        if int(d.get("format_version", 0)) > SIDECAR_VERSION:
            raise ArtifactError(
                f"{source} was written by a newer ditrt (sidecar format {d['format_version']}, this ditrt reads {SIDECAR_VERSION}): "
                "upgrade ditrt or rebuild the engine with `ditrt build`"
            )
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        missing = sorted(required - d.keys())
        if missing:
            raise ArtifactError(f"{source} lacks {', '.join(missing)}; rebuild the engine with `ditrt build`")
        try:
            profile_from_dict(d["profile"])  # {input: {"min"|"opt"|"max": shape}}
            return cls(**{k: v for k, v in d.items() if k in names})
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise ArtifactError(f"{source} is malformed ({e}); rebuild the engine with `ditrt build`") from None

    def rebuild_hint(self, engine_path: Path | str = "M.plan") -> str:
        return f"rebuild it with `ditrt build --onnx {self.onnx_path} --out {engine_path}`"


def make_sidecar(
    *,
    tensorrt_version: str,
    gpu_name: str,
    compute_capability: tuple[int, int],
    onnx_path: Path,
    onnx_sha256: str,
    engine_sha256: str,
    precision: str | None,
    profile: dict,
    build: dict,
    precision_source: str | None = None,
    onnx_metadata: dict | None = None,
) -> EngineSidecar:
    return EngineSidecar(
        tensorrt_version=str(tensorrt_version), gpu_name=str(gpu_name), compute_capability=tuple(compute_capability),
        onnx_path=str(onnx_path), onnx_sha256=onnx_sha256, engine_sha256=engine_sha256, precision=precision,
        profile=dict(profile), build=dict(build), precision_source=precision_source, onnx_metadata=dict(onnx_metadata or {}),
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )  # fmt: skip


def save_sidecar(sidecar: EngineSidecar, engine_path: Path) -> Path:
    """Write ``engine_path``'s sidecar atomically; returns its path."""
    text = json.dumps(sidecar.to_dict(), indent=2, sort_keys=True) + "\n"
    return atomic_write(sidecar_path(engine_path), lambda tmp: Path(tmp).write_text(text))


def load_sidecar(engine_path: Path) -> EngineSidecar:
    """Read the sidecar of ``engine_path``; a missing or corrupt one is an :class:`ArtifactError`."""
    engine_path = Path(engine_path)
    path = sidecar_path(engine_path)
    if not path.is_file():
        raise ArtifactError(
            f"engine {engine_path} has no sidecar {path.name} (ditrt writes both): rebuild it with `ditrt build --onnx M.onnx --out {engine_path}`"
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(
            f"engine sidecar {path} is corrupt ({e}): rebuild the engine with `ditrt build --onnx M.onnx --out {engine_path}`"
        ) from None
    return EngineSidecar.from_dict(data, source=f"engine sidecar {path}")


def verify_sidecar(
    sidecar: EngineSidecar,
    *,
    trt_version: str,
    gpu_name: str,
    compute_capability: tuple[int, int],
    onnx_path: Path | None = None,
    engine_path: Path | None = None,
) -> None:
    """Refuse an engine that cannot (or should not) run here, with one line naming the fix.

    Checked in order: the TensorRT version (engines are not portable across versions), the GPU
    (name and compute capability: engines are tuned for one GPU model), the engine file against
    its recorded hash (when ``engine_path`` is given), and the ONNX against the hash it was built
    from (when ``onnx_path`` is given). Raises :class:`ArtifactError`.
    """
    engine = engine_path if engine_path is not None else "M.plan"
    fix = sidecar.rebuild_hint(engine)
    if str(trt_version) != sidecar.tensorrt_version:
        raise ArtifactError(
            f"engine {engine} was built by TensorRT {sidecar.tensorrt_version}, this is TensorRT {trt_version}: {fix}"
        )
    here = tuple(int(v) for v in compute_capability)
    if here != sidecar.compute_capability or str(gpu_name) != sidecar.gpu_name:
        raise ArtifactError(
            f"engine {engine} was built for {sidecar.gpu_name} ({sm(sidecar.compute_capability)}), "
            f"this GPU is {gpu_name} ({sm(here)}): engines are specific to one GPU model; {fix} on this GPU"
        )
    if engine_path is not None:
        check_engine_hash(sidecar, engine_path)
    if onnx_path is not None:
        current = onnx_sha256(Path(onnx_path))  # raises ArtifactError if missing or unreadable
        if current != sidecar.onnx_sha256:
            raise ArtifactError(
                f"the ONNX {onnx_path} changed since engine {engine} was built "
                f"(sha256 {current[:12]} != {sidecar.onnx_sha256[:12]}): {fix}"
            )


def read_engine(sidecar: EngineSidecar, engine_path: Path) -> bytes:
    """The bytes of ``engine_path``, read once and checked against the hash its sidecar recorded, so
    that what is deserialized is exactly what was checked (no second read of a file that may change)."""
    engine_path = Path(engine_path)
    try:
        data = engine_path.read_bytes()
    except OSError as e:
        raise ArtifactError(f"cannot read engine {engine_path} ({e.strerror or e}): {sidecar.rebuild_hint(engine_path)}") from None
    check_engine_hash(sidecar, engine_path, data)
    return data


def check_engine_hash(sidecar: EngineSidecar, engine_path: Path, data: bytes | None = None) -> None:
    """Refuse an engine file (or ``data``, the bytes read from it) whose sha256 is not its sidecar's."""
    fix = sidecar.rebuild_hint(engine_path)
    if data is None:
        if not Path(engine_path).is_file():
            raise ArtifactError(f"engine {engine_path} not found: {fix}")
        digest = file_sha256(engine_path)
    else:
        digest = hashlib.sha256(data).hexdigest()
    if digest != sidecar.engine_sha256:
        raise ArtifactError(f"engine {engine_path} does not match its sidecar (sha256 differs; it was replaced after the build): {fix}")
