"""The export stage: a DiT (float or quantized by a recipe) to ONNX, and the TensorRT rule checker.

``export_model(model, path, *, dtype, recipe, tensors)`` writes the artifact (one graph, or one per
timestep group and their manifest; ``export_onnx`` is the one-graph step); ``check_onnx(path)``
lists what TensorRT's strongly typed Q/DQ rules would reject. The I/O contract is :mod:`ditrt.contracts.spec`.
"""

from ditrt.export.check import Violation, check_onnx
from ditrt.export.onnx_export import DEFAULT_OPSET, export_model, export_onnx

__all__ = ["DEFAULT_OPSET", "Violation", "check_onnx", "export_model", "export_onnx"]
