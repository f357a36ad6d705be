"""The ONNX Runtime denoiser: parity with torch, the sampler loop, fused int8/int4 kernels, errors."""

import re

import onnx
import pytest
import torch

from ditrt.contracts.errors import ArtifactError, ConfigError, InputError, MissingDependencyError
from ditrt.contracts.spec import DiTSpec
from ditrt.diffusion.sampler import SamplerConfig, sample
from ditrt.models.quantized import quantized_model
from ditrt.runtime.onnxruntime_backend import (
    OnnxRuntimeDenoiser,
    device_providers,
    make_session,
    onnxruntime_device,
    open_onnxruntime,
    resolve_providers,
)
from ditrt.runtime.torch_backend import TorchDenoiser
from tests.conftest import TINY
from tests.export.recipes import rel_l2


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model(models):
    return models["tiny"]


@pytest.fixture(scope="module")
def graphs(exported, recipes):
    """precision -> (path, recipe, tensors) for TINY: float32, w8a8 and w4a16 (every Linear quantized; the
    suite's graphs, tests/conftest.py)."""
    out = {"fp32": (exported("tiny"), None, None)}
    for precision in ("w8a8", "w4a16"):
        out[precision] = (exported("tiny", precision), *recipes("tiny", precision))
    return out


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("precision", ["fp32", "w8a8", "w4a16"])
def test_denoiser_matches_torch(model, graphs, precision, batch):
    path, recipe, tensors = graphs[precision]
    reference = model if recipe is None else quantized_model(model, recipe, tensors)
    x, t, y = DiTSpec(TINY).sample_inputs(batch, seed=11)
    out = OnnxRuntimeDenoiser(path, threads=1)(x, t, y)
    with torch.no_grad():
        ref = reference(x, t, y)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert rel_l2(out, ref) <= 1e-3  # measured: fp32 2e-7, w8a8 1.4e-7, w4a16 3e-7


def test_sampling_loop_matches_the_torch_denoiser(model, graphs):
    """Ten DDPM steps with guidance (batch doubled to 6 inside the loop) through both backends."""
    cfg = SamplerConfig(steps="10", cfg_scale=2.0)
    kw = {"num_classes": TINY.num_classes, "image_shape": DiTSpec(TINY).image_shape}
    ort_samples = sample(OnnxRuntimeDenoiser(graphs["fp32"][0], threads=1), cfg, [1, 2, 3], [0, 1, 2], **kw)
    torch_samples = sample(TorchDenoiser(model), cfg, [1, 2, 3], [0, 1, 2], **kw)
    assert rel_l2(ort_samples, torch_samples) <= 1e-4


@pytest.mark.parametrize("precision, fused", [("w8a8", "MatMulIntegerToFloat"), ("w4a16", "MatMulNBits")])
def test_quantized_linears_run_on_integer_kernels(graphs, tmp_path, precision, fused):
    path, recipe, _ = graphs[precision]
    optimized = tmp_path / "optimized.onnx"
    make_session(path, threads=1, optimized_model_path=optimized)
    ops = [n.op_type for n in onnx.load(str(optimized)).graph.node]
    assert ops.count(fused) == len(recipe.layers) == 14
    assert "DequantizeLinear" not in ops and "Gemm" not in ops


def test_session_settings(graphs):
    d = OnnxRuntimeDenoiser(graphs["w4a16"][0], threads=1)
    opts = d.session.get_session_options()
    assert opts.intra_op_num_threads == 1
    assert opts.get_session_config_entry("session.qdq_matmulnbits_accuracy_level") == "0"
    assert d.providers == ["CPUExecutionProvider"]
    assert d.metadata["ditrt.precision"] == "w4a16"


def test_inputs_of_the_wrong_shape_or_type_are_refused(graphs):
    d = OnnxRuntimeDenoiser(graphs["fp32"][0], threads=1)
    x, t, y = DiTSpec(TINY).sample_inputs(2)
    name = re.escape(graphs["fp32"][0].name)
    with pytest.raises(InputError, match=rf"input x has shape \(2, 4, 4, 4\) but {name} expects \('batch', 4, 8, 8\)"):
        d(x[:, :, :4, :4], t, y)
    with pytest.raises(InputError, match="share one batch size"):
        d(x, t[:1], y)
    with pytest.raises(InputError, match="labels y must be integers"):
        d(x, t, y.float())
    assert d(x.double(), t.double(), y.int()).shape == (2, 8, 8, 8)  # other float/int types are converted


def test_missing_and_corrupt_files_are_artifact_errors(tmp_path):
    with pytest.raises(ArtifactError, match="not found; create it with `ditrt export`"):
        OnnxRuntimeDenoiser(tmp_path / "none.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file" * 8)
    with pytest.raises(ArtifactError, match="ONNX Runtime cannot load .*bad.onnx"):
        OnnxRuntimeDenoiser(bad)


def test_a_graph_with_other_io_names_is_refused(tmp_path):
    from onnx import TensorProto, helper

    g = helper.make_graph(
        [helper.make_node("Identity", ["a"], ["b"])], "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1])], [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1])],
    )  # fmt: skip
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    onnx.save(m, str(tmp_path / "other.onnx"))
    with pytest.raises(ArtifactError, match=r"not x, t, y -> out"):
        OnnxRuntimeDenoiser(tmp_path / "other.onnx")


def test_providers():
    assert resolve_providers(None) == ["CPUExecutionProvider"] == resolve_providers("cpu")
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert resolve_providers("cuda") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    else:
        with pytest.raises(MissingDependencyError, match="install onnxruntime-gpu"):
            resolve_providers(["cuda"])


def test_a_cuda_device_asks_for_the_cuda_provider_on_that_gpu(graphs):
    """Each torchrun rank opens its graph on cuda:LOCAL_RANK: the CUDA provider gets that GPU's id
    (not ONNX Runtime's default GPU 0 for every rank). What is requested is checked on any machine;
    a session is made only with what this ONNX Runtime has."""
    import onnxruntime as ort

    assert device_providers("cpu") is None
    assert device_providers("cuda") == [("CUDAExecutionProvider", {"device_id": 0})]
    assert device_providers("cuda:3") == [("CUDAExecutionProvider", {"device_id": 3})]
    with pytest.raises(ConfigError, match="not cuda or cuda:N"):
        device_providers("cuda:x")
    pair = ("CUDAExecutionProvider", {"device_id": 3})
    assert onnxruntime_device("cpu") == "cpu"
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert resolve_providers([pair]) == [pair, "CPUExecutionProvider"] and onnxruntime_device("cuda:3") == "cuda:3"
    else:
        assert onnxruntime_device("cuda:3") == "cpu"  # where a caller that falls back runs the graph
        with pytest.raises(MissingDependencyError, match="install onnxruntime-gpu"):
            open_onnxruntime(graphs["fp32"][0], device="cuda:1")
    cpu = ("CPUExecutionProvider", {})
    assert resolve_providers([cpu]) == [cpu]  # pairs reach the session as they are
    assert OnnxRuntimeDenoiser(graphs["fp32"][0], providers=[cpu], threads=1).providers == ["CPUExecutionProvider"]
