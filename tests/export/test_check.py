"""check_onnx on small hand-built graphs (one broken rule each) and on a damaged export."""

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ditrt.contracts.errors import ArtifactError
from ditrt.export import Violation, check_onnx

K, N = 128, 8


def _init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def _save(tmp_path, nodes, inits, *, inputs=(("x", TensorProto.FLOAT, ["n", K]),), out=("n", N), opset=21):
    """A one-output graph: ``y`` float32 of shape ``out``."""
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(*i) for i in inputs], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    path = tmp_path / "g.onnx"
    onnx.save(model, str(path))
    return path


def _act_qdq(src="x", zp=0, scale_dtype=np.float32, prefix="x"):
    """Nodes and initializers of a per-tensor int8 Q -> DQ on ``src``; output ``{prefix}_dq``."""
    nodes = [
        helper.make_node("QuantizeLinear", [src, f"{prefix}_s", f"{prefix}_zp"], [f"{prefix}_q"], name=f"{prefix}_q"),
        helper.make_node(
            "DequantizeLinear", [f"{prefix}_q", f"{prefix}_s", f"{prefix}_zp"], [f"{prefix}_dq"], name=f"{prefix}_dq"
        ),
    ]
    return nodes, [_init(f"{prefix}_s", np.array(0.02, scale_dtype)), _init(f"{prefix}_zp", np.array(zp, np.int8))]


def _weight_dq(axis=1, n_scales=N, shape=(K, N)):
    w = _init("w", np.random.default_rng(0).integers(-127, 128, shape).astype(np.int8))
    return [helper.make_node("DequantizeLinear", ["w", "w_s"], ["w_dq"], name="w_dq", axis=axis)], [
        w,
        _init("w_s", np.full(n_scales, 0.01, np.float32)),
    ]


def _linear(tmp_path, *, zp=0, axis=1, n_scales=N):
    a_nodes, a_inits = _act_qdq(zp=zp)
    w_nodes, w_inits = _weight_dq(axis, n_scales)
    mm = helper.make_node("MatMul", ["x_dq", "w_dq"], ["y"], name="fc")
    return _save(tmp_path, a_nodes + w_nodes + [mm], a_inits + w_inits)


def _rules(violations):
    return {(v.node, v.rule) for v in violations}


def test_a_correct_w8a8_linear_passes(tmp_path):
    assert check_onnx(_linear(tmp_path)) == []


def test_non_zero_zero_point_is_named(tmp_path):
    found = check_onnx(_linear(tmp_path, zp=3))
    assert _rules(found) == {("x_q", "zero-point"), ("x_dq", "zero-point")}
    assert "symmetric" in found[0].message and str(found[0]).startswith("x_q: [zero-point]")


def test_qdq_on_a_layernorm_input_is_named(tmp_path):
    nodes, inits = _act_qdq()
    nodes.append(helper.make_node("LayerNormalization", ["x_dq", "gamma"], ["y"], name="norm1", axis=-1))
    found = check_onnx(_save(tmp_path, nodes, inits + [_init("gamma", np.ones(K, np.float32))], out=("n", K)))
    assert _rules(found) == {("x_dq", "qdq-nonlinear")}
    assert "norm1 (LayerNormalization)" in found[0].message


def test_qdq_reaching_layernorm_through_a_cast_is_found(tmp_path):
    nodes, inits = _act_qdq()
    nodes += [
        helper.make_node("Cast", ["x_dq"], ["x32"], name="to_fp32", to=TensorProto.FLOAT),
        helper.make_node("Softmax", ["x32"], ["y"], name="attn_softmax"),
    ]
    found = check_onnx(_save(tmp_path, nodes, inits, out=("n", K)))
    assert _rules(found) == {("x_dq", "qdq-nonlinear")} and "through Cast" in found[0].message


def test_qdq_on_the_attention_matmul_is_named(tmp_path):
    q_nodes, q_inits = _act_qdq("q", prefix="q")
    k_nodes, k_inits = _act_qdq("k", prefix="k")
    mm = helper.make_node("MatMul", ["q_dq", "k_dq"], ["y"], name="scores")
    inputs = (("q", TensorProto.FLOAT, ["n", 16, K]), ("k", TensorProto.FLOAT, ["n", K, 16]))
    found = check_onnx(_save(tmp_path, q_nodes + k_nodes + [mm], q_inits + k_inits, inputs=inputs, out=("n", 16, 16)))
    assert _rules(found) == {("q_dq", "qdq-attention"), ("k_dq", "qdq-attention")}


def test_qdq_on_a_residual_add_is_named(tmp_path):
    nodes, inits = _act_qdq()
    nodes.append(helper.make_node("Add", ["x_dq", "x"], ["y"], name="residual"))
    assert _rules(check_onnx(_save(tmp_path, nodes, inits, out=("n", K)))) == {("x_dq", "qdq-placement")}


def test_per_channel_axis_must_be_the_output_channels(tmp_path):
    found = check_onnx(_linear(tmp_path, axis=0, n_scales=K))
    assert ("w_dq", "per-channel-axis") in _rules(found)
    assert "use axis 1" in " ".join(v.message for v in found)


def test_out_in_weight_with_axis_0_then_transpose_passes(tmp_path):
    a_nodes, a_inits = _act_qdq()
    w_nodes, w_inits = _weight_dq(axis=0, shape=(N, K))
    nodes = a_nodes + w_nodes + [
        helper.make_node("Transpose", ["w_dq"], ["w_t"], name="w_t", perm=[1, 0]),
        helper.make_node("MatMul", ["x_dq", "w_t"], ["y"], name="fc"),
    ]  # fmt: skip
    assert check_onnx(_save(tmp_path, nodes, a_inits + w_inits)) == []


def _int4_weight(tmp_path, **dq_attrs):
    w = np.random.default_rng(1).integers(-8, 8, (K, N)).astype(ml_dtypes.int4)
    block = dq_attrs.get("block_size")
    scale = np.full((K // block, N) if block else (N,), 0.1, np.float32)
    nodes = [
        helper.make_node("DequantizeLinear", ["w4", "w4_s"], ["w_dq"], name="w4_dq", **dq_attrs),
        helper.make_node("MatMul", ["x", "w_dq"], ["y"], name="fc"),
    ]
    return _save(tmp_path, nodes, [numpy_helper.from_array(w, "w4"), _init("w4_s", scale)])


def test_int4_weights_with_block_64_pass(tmp_path):
    assert check_onnx(_int4_weight(tmp_path, axis=0, block_size=64)) == []


@pytest.mark.parametrize("attrs", [{"axis": 0, "block_size": 32}, {"axis": 1}])
def test_int4_weights_must_be_blocked_by_64_or_128(tmp_path, attrs):
    assert ("w4_dq", "int4-block") in _rules(check_onnx(_int4_weight(tmp_path, **attrs)))


def test_int4_activations_are_refused(tmp_path):
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp4"], ["xq"], name="x_q4"),
        helper.make_node("DequantizeLinear", ["xq", "s", "zp4"], ["y"], name="x_dq4"),
    ]
    inits = [_init("s", np.array(0.1, np.float32)), numpy_helper.from_array(np.array(0, ml_dtypes.int4), "zp4")]
    rules = _rules(check_onnx(_save(tmp_path, nodes, inits, out=("n", K))))
    assert {("x_q4", "int4-weight-only"), ("x_dq4", "int4-weight-only")} <= rules


def test_float16_activation_with_float32_scale_is_a_dtype_violation(tmp_path):
    nodes, inits = _act_qdq(scale_dtype=np.float32)
    nodes = [helper.make_node("Cast", ["x"], ["x16"], name="to_fp16", to=TensorProto.FLOAT16)] + nodes
    nodes[1].input[0] = "x16"
    w_nodes, w_inits = _weight_dq()
    nodes += w_nodes + [helper.make_node("MatMul", ["x_dq", "w_dq"], ["y"], name="fc")]
    found = check_onnx(_save(tmp_path, nodes, inits + w_inits))
    assert ("x_q", "qdq-dtype") in _rules(found)


def test_float16_scale_needs_opset_19(tmp_path):
    nodes, inits = _act_qdq(scale_dtype=np.float16)
    nodes = [helper.make_node("Cast", ["x"], ["x16"], name="to_fp16", to=TensorProto.FLOAT16)] + nodes
    nodes[1].input[0] = "x16"
    nodes.append(helper.make_node("Cast", ["x_dq"], ["y"], name="to_fp32", to=TensorProto.FLOAT))
    assert check_onnx(_save(tmp_path, nodes, inits, opset=19, out=("n", K))) == []
    found = check_onnx(_save(tmp_path, nodes, inits, opset=17, out=("n", K)))
    assert ("", "opset") in _rules(found) and ("", "onnx-checker") in _rules(found)


def test_scales_must_be_constants(tmp_path):
    nodes, inits = _act_qdq()
    nodes[0].input[1] = "runtime_scale"
    nodes[1].input[1] = "runtime_scale"
    inputs = (("x", TensorProto.FLOAT, ["n", K]), ("runtime_scale", TensorProto.FLOAT, []))
    nodes.append(helper.make_node("Relu", ["x_dq"], ["y"], name="relu"))
    found = check_onnx(_save(tmp_path, nodes, inits[1:], inputs=inputs, out=("n", K)))
    assert {("x_q", "scale-constant"), ("x_dq", "scale-constant")} <= _rules(found)


def test_damaged_export_names_the_layer(exported, tmp_path):
    m = onnx.load(str(exported("tiny", "w8a8")))
    zp = next(t for t in m.graph.initializer if t.name == "blocks.0.attn.qkv.input_zero_point")
    zp.CopyFrom(numpy_helper.from_array(np.array(5, np.int8), zp.name))
    path = tmp_path / "damaged.onnx"
    onnx.save(m, str(path))
    assert check_onnx(path) == [
        Violation(
            "blocks.0.attn.qkv/input_quantize",
            "zero-point",
            "zero point blocks.0.attn.qkv.input_zero_point is not 0 (max |zp| 5); TensorRT quantization is symmetric",
        ),
        Violation(
            "blocks.0.attn.qkv/input_dequantize",
            "zero-point",
            "zero point blocks.0.attn.qkv.input_zero_point is not 0 (max |zp| 5); TensorRT quantization is symmetric",
        ),
    ]


def test_missing_or_corrupt_files_are_artifact_errors(tmp_path):
    with pytest.raises(ArtifactError, match="not found"):
        check_onnx(tmp_path / "none.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ArtifactError, match="not a readable ONNX model"):
        check_onnx(tmp_path / "bad.onnx")


def test_non_finite_float_initializers_are_named_in_every_float_type(tmp_path):
    a_nodes, a_inits = _act_qdq(scale_dtype=np.float16)
    a_inits[0] = _init("x_s", np.array(np.inf, np.float16))  # a scale that overflowed float16
    w_nodes, w_inits = _weight_dq()
    w_inits[1] = _init("w_s", np.where(np.arange(N) == 3, np.nan, 0.01).astype(np.float32))
    nodes = [helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16, name="to16")]
    a_nodes[0].input[0] = "x16"
    mm = helper.make_node("MatMul", ["x_dq", "w_dq"], ["y16"], name="fc")
    back = helper.make_node("Cast", ["y16"], ["y"], to=TensorProto.FLOAT, name="to32")
    w_nodes[0].input[1] = "w_s16"
    w_cast = helper.make_node("Cast", ["w_s"], ["w_s16"], to=TensorProto.FLOAT16, name="w_s_cast")
    found = check_onnx(_save(tmp_path, nodes + a_nodes + [w_cast] + w_nodes + [mm, back], a_inits + w_inits))
    finite = [v for v in found if v.rule == "finite"]
    assert {(v.node, v.rule) for v in finite} == {("x_q", "finite"), ("w_s_cast", "finite")}, found
    by_node = {v.node: v.message for v in finite}
    assert by_node["x_q"].startswith("x_s (FLOAT16 []) holds 0 NaN and 1 infinite of 1 values")
    assert by_node["w_s_cast"].startswith(f"w_s (FLOAT [{N}]) holds 1 NaN and 0 infinite of {N} values")


def test_a_correct_graph_has_no_finite_violation_and_integers_are_not_read(tmp_path, monkeypatch):
    """With external data, only floating-point tensors are loaded by the finite rule (integers cannot be NaN)."""
    from onnx import external_data_helper

    path = _linear(tmp_path)
    m = onnx.load(str(path))
    onnx.save(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="g.data", size_threshold=0)
    loaded = []
    real = external_data_helper.load_external_data_for_tensor

    def spy(tensor, base_dir):
        loaded.append(tensor.name)
        return real(tensor, base_dir)

    monkeypatch.setattr(external_data_helper, "load_external_data_for_tensor", spy)
    assert check_onnx(path) == []
    assert "x_s" in loaded and "w_s" in loaded  # the float scales are read ...
    assert "w" not in loaded  # ... the int8 weight is not (zero points are read by the zero-point rule only)


def test_an_exported_float16_graph_with_an_overflowed_weight_fails_the_finite_rule(exported, tmp_path):
    m = onnx.load(str(exported("tiny", "w8a8", "fp16")))
    t = next(t for t in m.graph.initializer if t.data_type == TensorProto.FLOAT16 and np.prod(t.dims) > 1)
    a = numpy_helper.to_array(t).copy()
    a.flat[0] = np.inf
    t.CopyFrom(numpy_helper.from_array(a, t.name))
    onnx.save(m, str(tmp_path / "inf.onnx"))
    assert check_onnx(exported("tiny", "w8a8", "fp16")) == []
    found = check_onnx(tmp_path / "inf.onnx")
    assert [v.rule for v in found] == ["finite"] and found[0].message.startswith(f"{t.name} (FLOAT16 "), found
