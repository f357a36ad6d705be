"""``engine_from_onnx``: a strongly typed TensorRT engine from a ditrt ONNX graph, by composing
Polygraphy's TensorRT loaders, written atomically with its sidecar.

TensorRT is imported lazily: this module imports (and its pure parts run) without it.
Precision comes only from the graph (TensorRT 10.12+ strong typing, the only mode on 11.x):
float16 from its dtypes and Casts, INT8/INT4/FP8 from its Q/DQ nodes. No FP16/INT8 builder flags,
no calibrator. A precision that needs newer tensor cores (fp8: compute capability 8.9) is refused on
an older GPU before TensorRT is imported.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from ditrt.contracts.errors import ArtifactError, ConfigError, MissingDependencyError
from ditrt.contracts.files import atomic_write, onnx_sha256
from ditrt.contracts.groups import group_file, manifest_path, read_manifest, write_manifest
from ditrt.contracts.precisions import PRECISIONS, get_precision
from ditrt.contracts.profile import BuildConfig, ShapeRange, profile_shapes, profile_to_dict
from ditrt.contracts.sidecar import make_sidecar, save_sidecar, sidecar_path
from ditrt.engines.onnx_info import read_onnx

log = logging.getLogger(__name__)

MIN_TENSORRT = (10, 12)
INSTALL_HINT = (
    "install TensorRT 10.12+ with `pip install tensorrt-cu12` (or tensorrt-cu13; the wheels fetch their libraries "
    "from NVIDIA's index, pypi.nvidia.com) or run inside an NGC TensorRT container (nvcr.io/nvidia/tensorrt)"
)


def _version_tuple(version: str) -> tuple[int, ...]:
    out = []
    for part in str(version).split(".")[:2]:
        digits = "".join(c for c in part if c.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def import_tensorrt(*, builder: bool = True):
    """The ``tensorrt`` module, or :class:`MissingDependencyError` with the install hint.

    ``builder=True`` also requires the builder and ONNX parser (a lean runtime has neither)."""
    try:
        import tensorrt as trt
    except Exception as e:  # noqa: BLE001  ImportError, or OSError/RuntimeError from a placeholder wheel without its libraries
        detail = "" if isinstance(e, ModuleNotFoundError) else f" (import failed: {type(e).__name__})"
        raise MissingDependencyError(f"TensorRT is not installed{detail}: {INSTALL_HINT}") from None
    version = getattr(trt, "__version__", "0")
    if _version_tuple(version) < MIN_TENSORRT:
        raise MissingDependencyError(
            f"TensorRT {version} is too old (ditrt needs 10.12+ for strongly typed networks): {INSTALL_HINT}"
        )
    if builder and not (hasattr(trt, "Builder") and hasattr(trt, "OnnxParser")):
        raise MissingDependencyError(
            f"the installed TensorRT {version} has no builder or ONNX parser (a lean runtime): {INSTALL_HINT}"
        )
    return trt


def require_cuda_gpu(device: str | None = None) -> int:
    """The index of the CUDA device ``device`` names ("cuda", "cuda:N"; None or "cuda": the current
    one), or :class:`MissingDependencyError` saying why there is none, :class:`ConfigError` for a
    device that is not a GPU here."""
    import torch

    if device is not None and str(device).split(":")[0] != "cuda":
        raise ConfigError(f"TensorRT builds and runs engines on a CUDA device, not {device}; use --device cuda (or cuda:N)")
    if not torch.cuda.is_available():
        why = "a CPU-only build of torch" if torch.version.cuda is None else "torch sees no CUDA device"
        raise MissingDependencyError(
            f"TensorRT needs an NVIDIA GPU and there is none here ({why}, torch {torch.__version__}): "
            "run on a machine with an NVIDIA GPU, its driver and a CUDA build of torch"
        )
    index = torch.device(device).index if device is not None else None
    if index is None:
        return torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise ConfigError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return index


def gpu_identity(index: int) -> tuple[str, tuple[int, int]]:
    """(name, compute capability) of CUDA device ``index``, as the sidecar records them."""
    import torch

    return torch.cuda.get_device_name(index), tuple(torch.cuda.get_device_capability(index))


def tensorrt_available(*, builder: bool = True) -> tuple[bool, str]:
    """(True, "TensorRT X on GPU") when engines can be built (``builder``) and run here, else (False, why)."""
    try:
        trt = import_tensorrt(builder=builder)
        index = require_cuda_gpu()
    except MissingDependencyError as e:
        return False, str(e)
    name, capability = gpu_identity(index)
    return True, f"TensorRT {trt.__version__} on {name} (sm_{capability[0]}{capability[1]})"


def check_buildable(onnx_path, precision: str | None, dtype: str | None) -> None:
    """Refuse, before TensorRT is touched, a graph whose precision TensorRT has no kernels for, as the
    precision registry says (:meth:`Precision.check_buildable`); ``dtype``: the graph's float type
    ("fp32", "fp16"). Float graphs ("fp32", "fp16", ...) have no registry entry and always build."""
    if precision in PRECISIONS:
        get_precision(precision).check_buildable(dtype, onnx_path)


def check_gpu_supports(onnx_path, precision: str | None, capability: tuple[int, int]) -> None:
    """Refuse a graph whose precision needs newer tensor cores than a GPU of compute ``capability``
    (major, minor) has, as the registry says (:meth:`Precision.check_gpu`: fp8 needs 8.9, Ada and
    Hopper). A pure function of the capability: the caller reads it before TensorRT is imported."""
    if precision in PRECISIONS:
        get_precision(precision).check_gpu(capability, onnx_path)


def needs_gpu_check(precision: str | None) -> bool:
    """Whether ``precision`` asks for a minimum compute capability (the GPU is then read first)."""
    return precision in PRECISIONS and get_precision(precision).min_compute_capability is not None


def polygraphy_profile(shapes: dict[str, ShapeRange]):
    """Our profile as a ``polygraphy.backend.trt.Profile``."""
    from polygraphy.backend.trt import Profile

    profile = Profile()
    for name, r in shapes.items():
        profile.add(name, min=r.min, opt=r.opt, max=r.max)
    return profile


def _build_engine_bytes(trt, onnx_path: Path, shapes: dict[str, ShapeRange], config: BuildConfig):
    """Serialized engine (a buffer) from Polygraphy's loaders: parse -> configure -> build."""
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath
    from polygraphy.exception import PolygraphyException

    # 10.12-10.x: the STRONGLY_TYPED creation flag; 11.x is strongly typed anyway (the flag is accepted).
    strongly_typed = True if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED") else None
    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=strongly_typed)
    cache = str(config.timing_cache) if config.timing_cache is not None else None
    if config.timing_cache is not None:
        config.timing_cache.parent.mkdir(parents=True, exist_ok=True)
    pools = {trt.MemoryPoolType.WORKSPACE: int(config.workspace)} if config.workspace else None
    builder_config = CreateConfig(
        profiles=[polygraphy_profile(shapes)],
        builder_optimization_level=config.opt_level,
        load_timing_cache=cache,  # a missing file is fine: Polygraphy starts an empty cache
        memory_pool_limits=pools,
    )
    try:
        return EngineBytesFromNetwork(network, config=builder_config, save_timing_cache=cache)()
    except PolygraphyException as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ArtifactError(
            f"TensorRT could not build an engine from {onnx_path} ({reason}); check the graph with `ditrt check {onnx_path}` "
            "and see the TensorRT log above"
        ) from None


def engine_from_onnx(onnx_path: Path, out_path: Path, config: BuildConfig | None = None, *, device: str | None = None) -> Path:
    """Build ``out_path`` (a TensorRT engine) and ``out_path + ".json"`` (its sidecar) from ``onnx_path``.

    One optimization profile from :func:`profile_shapes` (batch covering the doubled guidance
    batch), builder optimization level and timing cache from ``config``, built on the GPU ``device``
    ("cuda:N"; None or "cuda": the current one), whose name and compute capability the sidecar
    records. Both files are written atomically: on any failure no half-written engine is left. Raises
    :class:`MissingDependencyError` without TensorRT or a CUDA GPU, :class:`ArtifactError` for a
    graph TensorRT refuses.
    """
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    config = config if config is not None else BuildConfig()
    if onnx_path.resolve() in (out_path.resolve(), sidecar_path(out_path).resolve()):
        raise ConfigError(f"--out {out_path} would overwrite the ONNX; name the engine e.g. {onnx_path.with_suffix('.plan')}")
    summary = read_onnx(onnx_path)
    check_buildable(onnx_path, summary.precision, summary.dtype)
    index = None
    if needs_gpu_check(summary.precision):  # an FP8 graph on a pre-Ada GPU is refused before TensorRT is imported
        index = require_cuda_gpu(device)
        check_gpu_supports(onnx_path, summary.precision, gpu_identity(index)[1])
    trt = import_tensorrt(builder=True)
    index = require_cuda_gpu(device) if index is None else index
    shapes = profile_shapes(summary.inputs, config)
    onnx_hash = onnx_sha256(onnx_path, summary.external_data)
    gpu_name, capability = gpu_identity(index)
    log.info("building %s from %s (%s, batch %s) with TensorRT %s on %s (cuda:%d)", out_path, onnx_path, summary.precision,
             config.engine_batch, trt.__version__, gpu_name, index)  # fmt: skip
    import torch

    with torch.cuda.device(index):  # TensorRT builds for the current CUDA device
        engine_bytes = _build_engine_bytes(trt, onnx_path, shapes, config)
    data = memoryview(engine_bytes).cast("B")
    sidecar = make_sidecar(
        tensorrt_version=trt.__version__, gpu_name=gpu_name, compute_capability=capability,
        onnx_path=onnx_path, onnx_sha256=onnx_hash, engine_sha256=hashlib.sha256(data).hexdigest(),
        precision=summary.precision, precision_source=summary.precision_source, profile=profile_to_dict(shapes),
        build=config.to_dict(), onnx_metadata=summary.metadata,
    )  # fmt: skip
    atomic_write(out_path, lambda tmp: Path(tmp).write_bytes(data))
    try:
        save_sidecar(sidecar, out_path)
    except BaseException:
        out_path.unlink(missing_ok=True)  # an engine without its sidecar would be refused anyway
        raise
    log.info("wrote %s (%.1f MB) and %s", out_path, data.nbytes / 1e6, sidecar_path(out_path).name)
    return out_path


def engines_from_manifest(manifest: Path, out_path: Path, config: BuildConfig | None = None, *, device: str | None = None) -> Path:
    """One engine per timestep group: ``<out stem>.g<i><out suffix>`` (each with its sidecar) from the
    graphs of the ONNX manifest ``manifest`` (from ``ditrt export`` of a recipe with timestep groups),
    and the engine manifest ``<out stem>.groups.json`` that ``ditrt sample --engine`` reads.

    All or nothing: if any build fails, the engines this call wrote are removed and no manifest is
    written. Same errors as :func:`engine_from_onnx`."""
    manifest, out_path = Path(manifest), Path(out_path)
    edges, graphs = read_manifest(manifest, "onnx")
    suffix = out_path.suffix if out_path.suffix and not str(out_path).endswith(".groups.json") else ".plan"
    out_manifest = manifest_path(out_path)
    if out_manifest.resolve() == manifest.resolve():
        alt = out_path.with_name(f"{out_manifest.name[: -len('.groups.json')]}.trt.plan")
        raise ConfigError(f"--out {out_path} would overwrite the ONNX manifest {manifest}; name the engines e.g. {alt}")
    import_tensorrt(builder=True)  # fail before anything is read further or written
    require_cuda_gpu(device)
    engines: list[Path] = []
    try:
        for g, graph in enumerate(graphs):
            log.info("timestep group %d of %d", g + 1, len(graphs))
            engines.append(engine_from_onnx(graph, group_file(out_path, g, suffix), config, device=device))
        return write_manifest(out_path, edges, engines, "tensorrt")
    except BaseException:
        for engine in engines:
            engine.unlink(missing_ok=True)
            sidecar_path(engine).unlink(missing_ok=True)
        raise


def build_engines(onnx: Path, out_path: Path, config: BuildConfig | None = None, *, device: str | None = None) -> Path:
    """The engine stage's one entry point: engines for an exported artifact, a graph or a graph manifest,
    built on the GPU ``device`` (None: the current one).

    One graph gives one engine at ``out_path`` (:func:`engine_from_onnx`); a timestep-group manifest
    one engine per group and their manifest (:func:`engines_from_manifest`, whose path is returned).
    Either way :func:`ditrt.contracts.groups.read_artifact` reads the result."""
    from ditrt.contracts.groups import is_group_manifest

    if is_group_manifest(onnx):
        return engines_from_manifest(onnx, out_path, config, device=device)
    return engine_from_onnx(onnx, out_path, config, device=device)
