from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper


def write_tiny_onnx(path: Path, *, batch="N", hw=8, channels=4, metadata: dict | None = None, weight_dtype=None) -> Path:
    """A real ONNX graph with ditrt's I/O contract: x (N, C, H, W) float32, t (N,) float32, y (N,) int64
    -> out (N, 2C, H, W) float32. ``out = concat(x, x * w)``; ``weight_dtype`` picks the type of ``w``'s
    initializer (a Cast/DequantizeLinear brings it back to float32) so precision inference has something to read."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, channels, hw, hw])
    t = helper.make_tensor_value_info("t", TensorProto.FLOAT, [batch])
    y = helper.make_tensor_value_info("y", TensorProto.INT64, [batch])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, [batch, 2 * channels, hw, hw])
    nodes, inits = [], []
    if weight_dtype in (None, "fp32"):
        inits.append(numpy_helper.from_array(np.full((1,), 0.5, np.float32), "w"))
    elif weight_dtype == "fp16":
        inits.append(numpy_helper.from_array(np.full((1,), 0.5, np.float16), "w16"))
        nodes.append(helper.make_node("Cast", ["w16"], ["w"], to=TensorProto.FLOAT))
    elif weight_dtype in ("int8", "int4"):
        qtype = TensorProto.INT8 if weight_dtype == "int8" else TensorProto.INT4
        inits.append(helper.make_tensor("wq", qtype, [1], [3]))
        inits.append(numpy_helper.from_array(np.float32(0.25), "ws"))
        nodes.append(helper.make_node("DequantizeLinear", ["wq", "ws"], ["w"]))
    nodes += [helper.make_node("Mul", ["x", "w"], ["xw"]), helper.make_node("Concat", ["x", "xw"], ["out"], axis=1)]
    graph = helper.make_graph(nodes, "tiny", [x, t, y], [out], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    for k, v in (metadata or {}).items():
        model.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture
def tiny_onnx(tmp_path) -> Path:
    return write_tiny_onnx(tmp_path / "tiny.onnx")
