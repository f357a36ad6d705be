"""What ONNX Runtime makes of ditrt's graphs at the built-in model's shape (issue 15): the kernels it
runs with ditrt's session settings, against what its defaults would run; the Linear biases ditrt folds
into the int8 kernels (ditrt/runtime/onnxruntime_rewrites.py)."""

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from ditrt.contracts.model_config import CONFIGS
from ditrt.contracts.spec import DiTSpec
from ditrt.runtime.onnxruntime_backend import DISABLED_OPTIMIZERS, make_session
from ditrt.runtime.onnxruntime_rewrites import BIAS_INPUT, fold_integer_gemm_bias
from tests.conftest import SHARED

DEPTH = CONFIGS["ditrt-digits"].depth


def optimized_graph(path, tmp_path, **options) -> onnx.GraphProto:
    """The graph as ONNX Runtime runs it with ditrt's session (and these options)."""
    out = tmp_path / f"{path.stem}-{len(list(tmp_path.iterdir()))}.optimized.onnx"
    make_session(path, threads=1, optimized_model_path=out, **options)
    return onnx.load(str(out), load_external_data=False).graph


def optimized_ops(path, tmp_path, **options) -> Counter:
    return Counter(n.op_type for n in optimized_graph(path, tmp_path, **options).node)


@pytest.mark.parametrize("precision", ["float", "w8a8"])
def test_layer_norms_run_as_plain_layer_normalization(exported, tmp_path, precision):
    """ONNX Runtime's SkipLayerNormFusion would fuse the last residual Add into the final LayerNorm,
    a kernel 6x slower than the two it replaces; ditrt's sessions keep every LayerNorm plain."""
    path = exported("digits", precision)
    ops = optimized_ops(path, tmp_path)
    assert ops["SkipLayerNormalization"] == 0 and ops["LayerNormalization"] == 2 * DEPTH + 1
    without_the_switch = optimized_ops(path, tmp_path, disabled_optimizers=tuple(o for o in DISABLED_OPTIMIZERS if o != "SkipLayerNormFusion"))
    assert without_the_switch["SkipLayerNormalization"] == 1 and without_the_switch["LayerNormalization"] == 2 * DEPTH


def test_matmul_add_fusion_would_take_the_2d_linears_off_the_int8_kernel(exported, tmp_path):
    """Why the MatMulAddFusion switch stays with ONNX Runtime 1.32: it leaves the 3-D token Linears alone
    (dynamic batch) but turns the 2-D ones (adaLN and the timestep MLP, quantized here) into float Gemms.
    With the switch every Linear runs on the int8 kernel (biases left as ONNX Runtime places them)."""
    path = exported("digits", "w8a8")
    ditrt = optimized_ops(path, tmp_path, fold_bias=False)
    linears = 5 * DEPTH + 4  # the suite recipe quantizes every Linear: qkv, proj, fc1, fc2, adaLN per block and 4 more
    assert ditrt["MatMulIntegerToFloat"] == linears and ditrt["Gemm"] == 0 and ditrt["DequantizeLinear"] == 0
    fusion_on = optimized_ops(path, tmp_path, disabled_optimizers=tuple(o for o in DISABLED_OPTIMIZERS if o != "MatMulAddFusion"), fold_bias=False)
    two_d = DEPTH + 3  # adaLN of every block and of the final layer, the timestep MLP's two
    assert fusion_on["MatMulIntegerToFloat"] == linears - two_d and fusion_on["Gemm"] == two_d


def _kernel_biases(path, tmp_path, **options):
    """(MatMulIntegerToFloat nodes with a bias input, those without, Adds of a constant to one's
    output) in the graph as ONNX Runtime runs it."""
    graph = optimized_graph(path, tmp_path, **options)
    constants = {t.name for t in graph.initializer}
    kernels = [n for n in graph.node if n.op_type == "MatMulIntegerToFloat"]
    with_bias = [n for n in kernels if len(n.input) > BIAS_INPUT and n.input[BIAS_INPUT]]
    outs = {n.output[0] for n in kernels}
    adds = [n for n in graph.node if n.op_type == "Add" and outs & set(n.input) and constants & set(n.input)]
    return with_bias, len(kernels) - len(with_bias), adds


@pytest.mark.parametrize("name", ["tiny", "digits"])
def test_w8a8_biases_run_inside_the_int8_kernels_with_the_same_outputs(models, exported, tmp_path, name):
    """ONNX Runtime leaves each quantized Linear's bias as an Add over its whole output; ditrt's sessions
    fold it into MatMulIntegerToFloat's bias input (fc1's stays in FastGelu, where ONNX Runtime put it),
    which computes the same values. TINY has the official DiT layout (2x2 patches, 4 channels)."""
    path = exported(name, "w8a8")
    depth = SHARED[name].depth
    with_bias, without, adds = _kernel_biases(path, tmp_path)
    assert len(with_bias) == 4 * depth + 4 and without == depth and adds == []  # every Linear but fc1; fc1 -> FastGelu(bias)
    plain_with, _, plain_adds = _kernel_biases(path, tmp_path, fold_bias=False)
    assert plain_with == [] and len(plain_adds) == 4 * depth + 4
    x, t, y = DiTSpec(SHARED[name]).sample_inputs(3, seed=5)
    feeds = {"x": x.numpy(), "t": t.numpy(), "y": y.numpy()}
    folded = make_session(path, threads=1).run(None, feeds)[0]
    plain = make_session(path, threads=1, fold_bias=False).run(None, feeds)[0]
    assert np.abs(folded - plain).max() <= 1e-6 * np.abs(plain).max()  # measured: bit-identical


def test_without_scratch_space_the_graph_runs_unfolded_and_says_so(exported, tmp_path, monkeypatch, caplog):
    import tempfile

    path = exported("digits", "w8a8")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no such folder"))
    with caplog.at_level("WARNING", logger="ditrt.runtime.onnxruntime_backend"):
        with_bias, _, adds = _kernel_biases(path, tmp_path)
    assert with_bias == [] and len(adds) == 4 * SHARED["digits"].depth + 4
    assert "runs without its biases folded" in caplog.text


def test_float_and_weight_only_graphs_are_not_rewritten(exported, tmp_path):
    """Only graphs with 8-bit activations run on MatMulIntegerToFloat; the others keep ONNX Runtime's
    graph (W4A16's MatMulNBits takes its bias in ONNX Runtime's own fusion)."""
    for precision in ("float", "w4a16"):
        path = exported("digits", precision)
        a, b = optimized_ops(path, tmp_path), optimized_ops(path, tmp_path, fold_bias=False)
        assert a == b and a["MatMulIntegerToFloat"] == 0


def _graph(bias_dims=(3,), extra_consumer=False, bias_is_input=False, as_output=False, preset_bias=False):
    """A MatMulIntegerToFloat (uint8 A (2, 4), int8 B (4, 3), per-column scale) and an Add of its output."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.integers(-127, 128, (4, 3)).astype(np.int8), "w"),
             numpy_helper.from_array(np.array(0.5, np.float32), "sa"), numpy_helper.from_array(np.array([0.1, 0.2, 0.3], np.float32), "sw"),
             numpy_helper.from_array(np.array(128, np.uint8), "za")]  # fmt: skip
    if not bias_is_input:
        inits.append(numpy_helper.from_array(rng.standard_normal(bias_dims).astype(np.float32), "b"))
    inputs = ["a", "w", "sa", "sw", "za", "", "b"] if preset_bias else ["a", "w", "sa", "sw", "za"]
    nodes = [helper.make_node("MatMulIntegerToFloat", inputs, ["m"], domain="com.microsoft"), helper.make_node("Add", ["m", "b"], ["y"])]
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])]
    if extra_consumer:
        nodes.append(helper.make_node("Relu", ["m"], ["r"]))
        outs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, [2, 3]))
    if as_output:
        outs.append(helper.make_tensor_value_info("m", TensorProto.FLOAT, [2, 3]))
    ins = [helper.make_tensor_value_info("a", TensorProto.UINT8, [2, 4])]
    if bias_is_input:
        ins.append(helper.make_tensor_value_info("b", TensorProto.FLOAT, [3]))
    g = helper.make_graph(nodes, "g", ins, outs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])


def test_the_bias_fold_computes_what_the_add_did():
    m = _graph()
    a = np.random.default_rng(1).integers(0, 256, (2, 4)).astype(np.uint8)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    before = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"a": a})[0]
    assert fold_integer_gemm_bias(m.graph) == 1
    assert [n.op_type for n in m.graph.node] == ["MatMulIntegerToFloat"] and list(m.graph.node[0].input)[BIAS_INPUT] == "b"
    assert m.graph.node[0].output[0] == "y"
    after = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"a": a})[0]
    np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", [{"bias_dims": (1, 3)}, {"bias_dims": (2,)}, {"extra_consumer": True}, {"bias_is_input": True},
                                  {"as_output": True}, {"preset_bias": True}])  # fmt: skip
def test_the_bias_fold_leaves_what_it_cannot_fold_exactly(case):
    """Not folded: a bias not of shape (N,), a product another node reads too, a bias that is no
    constant, a product the graph outputs, a kernel that has a bias already."""
    m = _graph(**case)
    before = m.SerializeToString()
    assert fold_integer_gemm_bias(m.graph) == 0 and m.SerializeToString() == before
