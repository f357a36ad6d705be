"""The export stage: a DiT (float or quantized by a recipe) to ONNX, and the TensorRT rule checker.

``export_onnx(model, path, *, dtype, recipe, tensors)`` writes the graph; ``check_onnx(path)`` lists
what TensorRT's strongly typed Q/DQ rules would reject. The I/O contract is :mod:`ditrt.contracts.spec`.
"""

from ditrt.contracts.spec import BATCH_DIM, INPUT_NAMES, OUTPUT_NAMES, DiTSpec
from ditrt.export.check import Violation, check_onnx
from ditrt.export.onnx_export import DEFAULT_OPSET, export_onnx

__all__ = ["BATCH_DIM", "DEFAULT_OPSET", "INPUT_NAMES", "OUTPUT_NAMES", "DiTSpec", "Violation", "check_onnx", "export_onnx"]
