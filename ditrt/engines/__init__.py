"""TensorRT engines: the build (one verb, :func:`engine_from_onnx`, and its per-timestep-group form).

Everything here imports without TensorRT; only the builds need it (and a GPU). What an engine is
built for and records, the build profile and the sidecar, are contracts
(:mod:`ditrt.contracts.profile`, :mod:`ditrt.contracts.sidecar`): the runtime reads them too.
"""

from ditrt.engines.build import build_engines, engine_from_onnx, engines_from_manifest, import_tensorrt, tensorrt_available

__all__ = ["build_engines", "engine_from_onnx", "engines_from_manifest", "import_tensorrt", "tensorrt_available"]
