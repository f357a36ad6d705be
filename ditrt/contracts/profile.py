"""What an engine is built for: :class:`BuildConfig` and the optimization profile it implies.

Pure functions, no TensorRT: the profile is computed from the ONNX input shapes, so it can be
checked (and tested) on any machine.

Batch sizes in a :class:`BuildConfig` count *images per sampler call*, as ``--batch-size`` does.
With classifier-free guidance the sampler doubles every call (conditional half, then null-class
half; see :func:`ditrt.diffusion.sampler.guided_output`), so a user who samples up to N images
at once needs an engine batch of 2N. The engine profile is therefore
``min = batch_min`` (not doubled: an unguided call at ``batch_min`` still fits),
``opt = 2 * batch_opt`` and ``max = 2 * batch_max``.

:func:`images_per_call` is the one place that turns an engine's rows back into images per sampler
call (the runtime, ``ditrt sample`` and the pipeline all ask it), and :func:`build_for_calls` the
one place that sizes an engine for the calls a run will make.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

from ditrt.contracts.errors import ArtifactError, ConfigError

#: Dimension as read from an ONNX input: an int, or a str/None for a dynamic axis.
Dim = int | str | None


class ShapeRange(NamedTuple):
    """min/opt/max shapes of one input, the three shapes of a TensorRT optimization profile."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


@dataclass(frozen=True)
class BuildConfig:
    """How ``ditrt build`` builds an engine. ``None`` means TensorRT's default.

    ``batch_*`` count images per sampler call; ``cfg`` says the sampler doubles each call for
    classifier-free guidance (so the engine batch range is doubled, see the module docstring).
    ``opt_level`` is the builder optimization level 0-5 (TensorRT's default is 3); ``timing_cache``
    is read if it exists and updated after the build; ``workspace`` caps the builder's workspace
    memory pool, in bytes.
    """

    batch_min: int = 1
    batch_opt: int = 4
    batch_max: int = 16
    cfg: bool = True
    opt_level: int | None = None
    timing_cache: Path | None = None
    workspace: int | None = None

    def __post_init__(self):
        for name in ("batch_min", "batch_opt", "batch_max"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not self.batch_min <= self.batch_opt <= self.batch_max:
            raise ConfigError(
                f"batch sizes must satisfy min <= opt <= max, got {self.batch_min}:{self.batch_opt}:{self.batch_max}"
            )
        if self.opt_level is not None and self.opt_level not in range(6):
            raise ConfigError(f"the builder optimization level must be 0-5, got {self.opt_level}")
        if self.workspace is not None and self.workspace <= 0:
            raise ConfigError(f"the workspace limit must be a positive number of bytes, got {self.workspace}")
        if self.timing_cache is not None and not isinstance(self.timing_cache, Path):
            object.__setattr__(self, "timing_cache", Path(self.timing_cache))

    @property
    def engine_batch(self) -> tuple[int, int, int]:
        """(min, opt, max) batch of the engine: opt and max doubled when ``cfg`` (N images -> 2N rows)."""
        k = 2 if self.cfg else 1
        return self.batch_min, k * self.batch_opt, k * self.batch_max

    def to_dict(self) -> dict:
        d = asdict(self)
        d["timing_cache"] = str(self.timing_cache) if self.timing_cache is not None else None
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> BuildConfig:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def rows_per_image(guided: bool) -> int:
    """Network rows per image of one sampler call: 2 with classifier-free guidance (conditional and null-class rows)."""
    return 2 if guided else 1


def images_per_call(max_rows: int | None, *, guided: bool, source: str = "the engine", min_rows: int = 1) -> int | None:
    """The most images one sampler call may hold on a backend that takes ``min_rows..max_rows`` rows
    per call (an engine's profile; None: any number, e.g. a graph with a dynamic batch).

    Raises :class:`ConfigError` when not even one image fits (an unguided ``--no-cfg`` engine of one
    row sampled with guidance), instead of a profile error at the first step."""
    if max_rows is None:
        return None
    k = rows_per_image(guided)
    most = int(max_rows) // k
    if most < 1 or most * k < min_rows:
        why = "guidance needs 2 rows per image (conditional and null class)" if guided else "unguided calls take 1 row per image"
        raise ConfigError(
            f"{source} takes {min_rows}..{max_rows} rows per call and {why}: sample with "
            f"{'--cfg-scale 1' if guided else 'guidance'} or rebuild it with `ditrt build --batch` (without --no-cfg for guidance)"
        )
    return most


def build_for_calls(images: int, *, guided: bool, rows: int = 0, **options) -> BuildConfig:
    """A :class:`BuildConfig` whose engine runs sampler calls of up to ``images`` images (its opt batch:
    the calls that repeat at every step) and any call of up to ``rows`` rows (e.g. comparison inputs),
    down to one image (a run's last, smaller chunk). ``options``: the other BuildConfig fields."""
    if not isinstance(images, int) or images < 1:
        raise ConfigError(f"an engine must take at least one image per call, got {images!r}")
    k = rows_per_image(guided)
    most = max(images, -(-int(rows) // k))
    return BuildConfig(batch_min=1, batch_opt=images, batch_max=most, cfg=guided, **options)


def parse_batch(text: str) -> tuple[int, int, int]:
    """``"MIN:OPT:MAX"`` (or a single ``"N"``, meaning ``1:N:N``) -> (min, opt, max) images per call."""
    raw = str(text).strip()
    parts = raw.split(":")
    if len(parts) == 1:
        parts = ["1", parts[0], parts[0]]
    if len(parts) != 3:
        raise ConfigError(f"--batch must be MIN:OPT:MAX (e.g. 1:8:16) or a single N, got {raw!r}")
    try:
        lo, opt, hi = (int(p) for p in parts)
    except ValueError:
        raise ConfigError(f"--batch must be whole numbers MIN:OPT:MAX (e.g. 1:8:16), got {raw!r}") from None
    if min(lo, opt, hi) < 1:
        raise ConfigError(f"--batch sizes must be at least 1, got {raw!r}")
    if not lo <= opt <= hi:
        raise ConfigError(f"--batch must satisfy MIN <= OPT <= MAX, got {raw!r}")
    return lo, opt, hi


def _is_dynamic(d: Dim) -> bool:
    return d is None or isinstance(d, str) or (isinstance(d, int) and d <= 0)


def profile_shapes(inputs: Mapping[str, Sequence[Dim]], config: BuildConfig) -> dict[str, ShapeRange]:
    """The optimization profile: for each input, its min/opt/max shape.

    ``inputs`` maps input names to ONNX shapes (e.g. ``{"x": ("N", 4, 32, 32), "t": ("N",),
    "y": ("N",)}``). Axis 0 must be the dynamic batch axis and every other axis static: ditrt
    engines have one image size. Raises :class:`ArtifactError` for any other layout.
    """
    if not inputs:
        raise ArtifactError("the ONNX graph has no inputs; re-export it with `ditrt export`")
    lo, opt, hi = config.engine_batch
    shapes = {}
    for name, shape in inputs.items():
        shape = tuple(shape)
        if not shape:
            raise ArtifactError(
                f"ONNX input {name!r} is a scalar; ditrt engines need a batch axis on every input (re-export with `ditrt export`)"
            )
        if not _is_dynamic(shape[0]):
            raise ArtifactError(
                f"ONNX input {name!r} has a fixed batch of {shape[0]}; re-export it with a dynamic batch axis (`ditrt export` does)"
            )
        rest = shape[1:]
        dynamic = [i + 1 for i, d in enumerate(rest) if _is_dynamic(d)]
        if dynamic:
            raise ArtifactError(
                f"ONNX input {name!r} {list(shape)} has dynamic non-batch axes {dynamic}; "
                "ditrt engines have a fixed image size: re-export with `ditrt export`"
            )
        rest = tuple(int(d) for d in rest)
        shapes[name] = ShapeRange((lo, *rest), (opt, *rest), (hi, *rest))
    return shapes


def profile_to_dict(shapes: Mapping[str, ShapeRange]) -> dict[str, dict[str, list[int]]]:
    """JSON form of a profile: ``{name: {"min": [...], "opt": [...], "max": [...]}}``."""
    return {name: {"min": list(r.min), "opt": list(r.opt), "max": list(r.max)} for name, r in shapes.items()}


def profile_from_dict(d: Mapping) -> dict[str, ShapeRange]:
    return {name: ShapeRange(tuple(r["min"]), tuple(r["opt"]), tuple(r["max"])) for name, r in d.items()}
