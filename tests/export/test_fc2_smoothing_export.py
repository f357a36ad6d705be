"""fc2 smoothing exported (issue 13 item 6): a recipe that smooths fc2 at run time exports one Mul by the
constant 1/d on the GELU output ahead of fc2's QuantizeLinear; `ditrt check` accepts it and ONNX Runtime
computes what the torch simulation computes."""

import dataclasses

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from ditrt.calibrate.methods import SmoothQuantSettings
from ditrt.calibrate.ptq import CalibrateConfig, calibrate
from ditrt.contracts.errors import ConfigError
from ditrt.contracts.quantizers import quantize
from ditrt.contracts.recipe import CalibrationSettings
from ditrt.contracts.spec import DiTSpec
from ditrt.diffusion.recording import record_calibration_inputs
from ditrt.export import check_onnx, export_onnx
from ditrt.models.quantized import input_reciprocal, quantized_model
from tests.conftest import TINY, random_dit
from tests.export.recipes import ort_session, rel_l2, run

SETTINGS = CalibrationSettings(steps="5", timesteps=2, samples=2)
FC2 = tuple(f"blocks.{i}.mlp.fc2" for i in range(TINY.depth))


@pytest.fixture(scope="module")
def tiny():
    return random_dit(TINY)


@pytest.fixture(scope="module")
def smoothed(tiny):
    """precision -> (recipe, tensors) smoothing fc2 at run time: SmoothQuant alpha 1.0 at w8a8, DiTAS at w4a16
    (SmoothQuant does not balance without activation quantization)."""
    batches = record_calibration_inputs(tiny, SETTINGS)
    configs = {"w8a8": CalibrateConfig(method="smoothquant", method_settings=SmoothQuantSettings(alpha=1.0), smooth_fc2=True,
                                       calibration=SETTINGS),
               "w4a16": CalibrateConfig(method="ditas", precision="w4a16", smooth_fc2=True, calibration=SETTINGS)}  # fmt: skip
    return {p: calibrate(tiny, c, batches) for p, c in configs.items()}


def _nodes(path):
    g = onnx.load(str(path)).graph
    return {n.name: n for n in g.node}, {t.name: t for t in g.initializer}, {o: n for n in g.node for o in n.output}


def test_w8a8_graph_multiplies_the_gelu_output_by_1_over_d_before_quantizing(tiny, smoothed, tmp_path):
    recipe, tensors = smoothed["w8a8"]
    assert recipe.runtime_smoothed == FC2
    path = export_onnx(tiny, tmp_path / "m.onnx", recipe=recipe, tensors=tensors)
    assert check_onnx(path) == []
    nodes, inits, producer = _nodes(path)
    assert sum(n.op_type == "Mul" and n.name.endswith("/input_smooth") for n in nodes.values()) == len(FC2)
    sim = quantized_model(tiny, recipe, tensors)
    probes = []
    for layer in FC2:
        mul, q = nodes[f"{layer}/input_smooth"], nodes[f"{layer}/input_quantize"]
        assert producer[mul.input[0]].op_type == "Gelu" and q.input[0] == mul.output[0]
        r = numpy_helper.to_array(inits[mul.input[1]])
        assert r.dtype == np.float32 and np.array_equal(r, input_reciprocal(tensors[f"quant.{layer}.input_divisor"]).numpy())
        probes += [onnx.helper.make_tensor_value_info(mul.input[0], onnx.TensorProto.FLOAT, None),
                   onnx.helper.make_tensor_value_info(q.output[0], onnx.TensorProto.INT8, None)]  # fmt: skip
    m = onnx.load(str(path))
    m.graph.output.extend(probes)
    onnx.save(m, str(tmp_path / "probed.onnx"))
    session = ort_session(tmp_path / "probed.onnx")
    x, t, y = DiTSpec(tiny.config).sample_inputs(3, seed=1)
    values = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"x": x.numpy(), "t": t.numpy(), "y": y.numpy()})))
    for layer in FC2:  # teacher forcing: on the graph's own GELU output, the integers are the simulation's
        mul, q, ql = nodes[f"{layer}/input_smooth"], nodes[f"{layer}/input_quantize"], sim.get_submodule(layer)
        gelu_out = torch.from_numpy(values[mul.input[0]])
        expected = quantize(gelu_out * input_reciprocal(ql.input_divisor), ql.input_scale, None, 8)
        assert torch.equal(torch.from_numpy(values[q.output[0]]).float(), expected), layer
    with torch.no_grad():
        assert rel_l2(values["out"], sim(x, t, y)) <= 1e-3  # the tiny-model parity bound of test_qdq


def test_float16_w4a16_graph_matches_the_simulation(tiny, smoothed, tmp_path):
    """Weight-only: the Mul feeds fc2's MatMul itself; in a float16 graph its constant is float16 (strong typing)."""
    recipe, tensors = smoothed["w4a16"]
    assert recipe.runtime_smoothed == FC2
    path = export_onnx(tiny, tmp_path / "m.onnx", recipe=recipe, tensors=tensors, dtype="fp16")
    assert check_onnx(path) == []
    nodes, inits, _ = _nodes(path)
    for layer in FC2:
        mul = nodes[f"{layer}/input_smooth"]
        assert nodes[f"{layer}/MatMul"].input[0] == mul.output[0]
        r = numpy_helper.to_array(inits[mul.input[1]])
        assert r.dtype == np.float16 and np.array_equal(r, input_reciprocal(tensors[f"quant.{layer}.input_divisor"]).numpy().astype(np.float16))
    x, t, y = DiTSpec(tiny.config).sample_inputs(3, seed=2)
    with torch.no_grad():
        ref = quantized_model(tiny, recipe, tensors)(x, t, y)
    assert rel_l2(run(ort_session(path), x, t, y), ref) <= 2e-3  # test_qdq's float16 W4A16 bound (float16 error)


def test_factors_float16_cannot_hold_are_refused_before_export(tiny, smoothed, tmp_path):
    recipe, tensors = smoothed["w8a8"]
    tiny_d = torch.full_like(tensors["quant.blocks.0.mlp.fc2.input_divisor"], 1e-6)  # 1/d = 1e6 > 65504
    bad = {**tensors, "quant.blocks.0.mlp.fc2.input_divisor": tiny_d}
    with pytest.raises(ConfigError, match="do not fit float16; export as fp32"):
        export_onnx(tiny, tmp_path / "m.onnx", recipe=recipe, tensors=bad, dtype="fp16")
    unlisted = dataclasses.replace(recipe, runtime_smoothed=FC2[:1])
    with pytest.raises(Exception, match="disagree on whether blocks.1.mlp.fc2"):
        export_onnx(tiny, tmp_path / "m.onnx", recipe=unlisted, tensors=tensors)
    assert not list(tmp_path.iterdir())
