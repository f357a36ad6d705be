"""TensorRT engines: the optimization profile, the build, and the sidecar manifest.

Everything here imports without TensorRT; only the builds (:func:`engine_from_onnx`,
:func:`engines_from_manifest`) need it (and a GPU).
"""

from ditrt.contracts.profile import BuildConfig, ShapeRange, parse_batch, profile_shapes
from ditrt.contracts.sidecar import EngineSidecar, load_sidecar, save_sidecar, sidecar_path, verify_sidecar
from ditrt.engines.build import engine_from_onnx, engines_from_manifest, import_tensorrt, tensorrt_available

__all__ = [
    "BuildConfig", "EngineSidecar", "ShapeRange", "engine_from_onnx", "engines_from_manifest", "import_tensorrt", "load_sidecar",
    "parse_batch", "profile_shapes", "save_sidecar", "sidecar_path", "tensorrt_available", "verify_sidecar",
]  # fmt: skip
