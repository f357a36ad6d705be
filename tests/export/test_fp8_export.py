"""FP8 (E4M3) graphs: FLOAT8E4M3FN weights behind a per-tensor DequantizeLinear, saturating per-tensor
Q/DQ with FLOAT8E4M3FN zero points of 0 on the activations, accepted by ``ditrt check`` (a broken one
refused), and run by ONNX Runtime on the CPU as the torch simulation computes them."""

import dataclasses

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from ditrt.calibrate.ptq import CalibrateConfig, calibrate
from ditrt.contracts.errors import ConfigError
from ditrt.contracts.model_config import CONFIGS
from ditrt.contracts.precisions import FP8_E4M3, get_precision
from ditrt.contracts.quantizers import quantize
from ditrt.contracts.recipe import CalibrationSettings
from ditrt.contracts.spec import DiTSpec
from ditrt.diffusion.recording import record_calibration_inputs
from ditrt.engines.onnx_info import read_onnx
from ditrt.export import check_onnx, export_onnx
from ditrt.models.quantized import quantized_model
from ditrt.quality.metrics import relative_error
from ditrt.runtime.onnxruntime_backend import OnnxRuntimeDenoiser
from tests.conftest import random_dit
from tests.contracts.test_fp8 import e4m3_values
from tests.export.recipes import ort_session, run

#: DiT-S/2's block layout (hidden 384, 6 heads of 64, patch 2, 4 latent channels) at 2 blocks on an 8 x 8 latent.
S2_LAYOUT = dataclasses.replace(CONFIGS["DiT-S/2"], depth=2, input_size=8, num_classes=10)
QUICK = CalibrationSettings(steps="10", timesteps=2, samples=2)


@pytest.fixture(scope="module")
def s2():
    """A random DiT-S/2-layout model, its fp8 min-max recipe (real calibration) and its graphs."""
    torch.set_num_threads(1)
    model = random_dit(S2_LAYOUT, std=0.03)
    recipe, tensors = calibrate(model, CalibrateConfig(method="minmax", precision="fp8", calibration=QUICK),
                                record_calibration_inputs(model, QUICK))  # fmt: skip
    return model, recipe, tensors


@pytest.fixture(scope="module")
def s2_graph(s2, tmp_path_factory):
    model, recipe, tensors = s2
    return export_onnx(model, tmp_path_factory.mktemp("fp8") / "s2.onnx", dtype="fp32", recipe=recipe, tensors=tensors)


def test_fp8_graph_layout_and_types(s2, s2_graph):
    model, recipe, tensors = s2
    m = onnx.load(str(s2_graph))
    nodes = {n.name: n for n in m.graph.node}
    inits = {t.name: t for t in m.graph.initializer}
    producer = {o: n for n in m.graph.node for o in n.output}
    assert check_onnx(s2_graph) == []  # onnx.checker (full) and the TensorRT rules
    assert read_onnx(s2_graph).precision == "fp8"
    for layer in recipe.layers:
        mm = nodes[f"{layer}/MatMul"]
        dq_w, dq_a = producer[mm.input[1]], producer[mm.input[0]]
        w = inits[dq_w.input[0]]  # FP8 values, pre-transposed (in, out), one scale
        lin = model.get_submodule(layer)
        assert w.data_type == TensorProto.FLOAT8E4M3FN and list(w.dims) == [lin.in_features, lin.out_features]
        scale = tensors[f"quant.{layer}.weight_scale"]
        assert numpy_helper.to_array(inits[dq_w.input[1]]).shape == () == tuple(scale.shape)
        expected = quantize(lin.weight.detach(), scale, None, FP8_E4M3).t()
        assert np.array_equal(numpy_helper.to_array(w).astype(np.float32), expected.numpy())
        q = producer[dq_a.input[0]]
        assert q.op_type == "QuantizeLinear" and helper.get_attribute_value(q.attribute[0]) == 1  # saturate=1
        for node in (q, dq_a):
            zp = inits[node.input[2]]
            assert zp.data_type == TensorProto.FLOAT8E4M3FN and float(numpy_helper.to_array(zp)) == 0.0


def test_onnxruntime_rounds_fp8_like_the_simulation(tmp_path):
    """ONNX's saturating QuantizeLinear in ONNX Runtime: every E4M3 value, the midpoints between them
    (ties to even) and the values beyond +-448 come out as the torch quantizer computes them."""
    v = e4m3_values()
    pos = v[v >= 0]
    x = torch.cat([v, (pos[:-1] + pos[1:]) / 2, -(pos[:-1] + pos[1:]) / 2, torch.tensor([500.0, -1e9, 464.0])]) * 0.25
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], saturate=1), helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"])],
        "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [len(x)])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [len(x)])],
        initializer=[numpy_helper.from_array(np.array(0.25, np.float32), "s"), helper.make_tensor("zp", TensorProto.FLOAT8E4M3FN, [], [0.0])],
    )  # fmt: skip
    path = tmp_path / "qdq.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(path))
    import onnxruntime as ort

    y = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    s = torch.tensor(0.25)
    assert np.array_equal(y, (quantize(x, s, None, FP8_E4M3) * s).numpy())


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_onnxruntime_matches_the_simulation_on_the_s2_layout(s2, s2_graph, dtype, tmp_path):
    model, recipe, tensors = s2
    path = s2_graph if dtype == "fp32" else export_onnx(model, tmp_path / "s2.onnx", dtype="fp16", recipe=recipe, tensors=tensors)
    assert check_onnx(path) == []
    x, t, y = DiTSpec(model.config).sample_inputs(4, seed=3)
    with torch.no_grad():
        sim = quantized_model(model, recipe, tensors)(x, t, y)
    out = run(ort_session(path), x, t, y)
    tol = get_precision("fp8").parity  # the INT8 bound: an FP8 rounding flips on a 1-ulp upstream difference as well
    assert float((out - sim).abs().mean()) <= tol.atol + tol.rtol * float(sim.abs().mean())
    assert relative_error(sim, out) <= (1e-3 if dtype == "fp32" else 2e-2)  # fp16: the graph computes in float16


def test_builtin_fp8_recipe_matches_its_simulation(tmp_path):
    """An fp8 ptq4dit recipe of the trained built-in model exports, passes ``ditrt check`` and runs in ONNX
    Runtime as simulated on every recorded calibration batch (50-step schedule, noisiest to cleanest step).
    The 50-step sampling run of issue 14's done-when (paired PSNR >= 40 dB) is ``ditrt pipeline`` (README)."""
    from ditrt.models.builtin import load_model

    torch.set_num_threads(1)
    builtin = load_model("builtin")
    settings = CalibrationSettings(steps="50", timesteps=4, samples=4)
    batches = record_calibration_inputs(builtin, settings, pixel_space=True)
    recipe, tensors = calibrate(builtin, CalibrateConfig(method="ptq4dit", precision="fp8", calibration=settings), batches)
    path = export_onnx(builtin, tmp_path / "b.onnx", dtype="fp32", recipe=recipe, tensors=tensors)
    assert check_onnx(path) == []
    sim, ort = quantized_model(builtin, recipe, tensors), OnnxRuntimeDenoiser(path, threads=1)
    with torch.no_grad():
        errors = [relative_error(sim(x, t, y), ort(x, t, y)) for x, t, y in batches]
    assert max(errors) <= 2e-2, errors  # the w8a8 bound of tests/export/test_builtin_parity.py


def _break(path, out, edit):
    m = onnx.load(str(path))
    edit(m)
    onnx.save(m, str(out))
    return out


def test_check_refuses_broken_fp8_graphs(s2_graph, tmp_path):
    def nonzero_zero_point(m):
        zp = next(t for t in m.graph.initializer if t.name.endswith(".input_zero_point"))
        zp.CopyFrom(helper.make_tensor(zp.name, TensorProto.FLOAT8E4M3FN, [], [2.0]))

    def no_saturation(m):
        q = next(n for n in m.graph.node if n.op_type == "QuantizeLinear")
        q.attribute[0].i = 0

    def e5m2(m):
        zp = next(t for t in m.graph.initializer if t.name.endswith(".input_zero_point"))
        zp.CopyFrom(helper.make_tensor(zp.name, TensorProto.FLOAT8E5M2, [], [0.0]))

    def old_opset(m):
        next(o for o in m.opset_import if o.domain in ("", "ai.onnx")).version = 18

    for edit, rule, words in [(nonzero_zero_point, "zero-point", "not 0"), (no_saturation, "fp8", "saturate=1"),
                              (e5m2, "fp8", "FLOAT8E5M2 is not TensorRT's FP8"), (old_opset, "opset", "declares opset 18")]:  # fmt: skip
        found = check_onnx(_break(s2_graph, tmp_path / f"{edit.__name__}.onnx", edit))
        assert any(v.rule == rule and words in v.message for v in found), (edit.__name__, [str(v) for v in found])


def test_export_refuses_fp8_below_opset_19(s2, tmp_path):
    model, recipe, tensors = s2
    with pytest.raises(ConfigError, match="fp8 needs opset 19"):
        export_onnx(model, tmp_path / "old.onnx", dtype="fp32", recipe=recipe, tensors=tensors, opset=18)
    assert not (tmp_path / "old.onnx").exists()
