"""`ditrt build` of an FP8 graph: refused on GPUs without FP8 tensor cores (compute capability < 8.9)
before TensorRT is imported; the capability rule is a pure function, checked here without a GPU."""

import sys

import pytest
from click.testing import CliRunner

import ditrt.cli.build_cmd  # noqa: F401  (registers `build` on the group)
from ditrt.cli import main
from ditrt.contracts.errors import ConfigError
from ditrt.engines.build import check_gpu_supports, needs_gpu_check
from ditrt.engines.onnx_info import read_onnx
from tests.engines.conftest import write_tiny_onnx


@pytest.mark.parametrize("capability", [(8, 0), (8, 6)])  # A100, RTX 30xx / A10
def test_an_fp8_graph_is_refused_below_compute_capability_8_9(capability):
    with pytest.raises(ConfigError, match=rf"m.onnx is fp8, which needs .*8\.9 or newer.*this GPU is {capability[0]}\.{capability[1]}"):
        check_gpu_supports("m.onnx", "fp8", capability)


@pytest.mark.parametrize("capability", [(8, 9), (9, 0)])  # L4 / L40S / RTX 40xx, H100 / H200
def test_an_fp8_graph_is_accepted_on_ada_and_hopper(capability):
    check_gpu_supports("m.onnx", "fp8", capability)


def test_only_fp8_asks_for_a_gpu_minimum():
    assert needs_gpu_check("fp8")
    assert not any(needs_gpu_check(p) for p in ("w8a8", "w4a16", "fp16", "fp32", None))
    check_gpu_supports("m.onnx", "w8a8", (7, 5))  # INT8 builds on Turing too


@pytest.fixture
def fp8_onnx(tmp_path):
    return write_tiny_onnx(tmp_path / "fp8.onnx", metadata={"ditrt.precision": "fp8"})


def test_build_reads_the_gpu_of_an_fp8_graph_before_importing_tensorrt(fp8_onnx, tmp_path, monkeypatch):
    """Here (no GPU) the FP8 build stops at the GPU, in one line, with TensorRT never imported; with a GPU
    it would stop there on a pre-Ada one (the rule above) with TensorRT still unimported."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: the GPU is found and the build goes on (tests/tensorrt)")
    assert read_onnx(fp8_onnx).precision == "fp8"
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    out = tmp_path / "fp8.plan"
    result = CliRunner().invoke(main, ["build", "--onnx", str(fp8_onnx), "--out", str(out)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "needs an NVIDIA GPU" in lines[0], lines
    assert "tensorrt" not in sys.modules and not out.exists()
