"""The engine stage on a graph from the real exporter (no TensorRT needed for these checks)."""

import pytest
from click.testing import CliRunner

import ditrt.cli.build_cmd  # noqa: F401  (registers `build`)
from ditrt.cli import main
from ditrt.contracts.profile import BuildConfig, profile_shapes
from ditrt.engines import tensorrt_available
from ditrt.engines.onnx_info import read_onnx
from tests.conftest import TINY


def test_exported_inputs_give_the_guidance_profile(exported):
    summary = read_onnx(exported("tiny"))  # the suite's float32 graph of the tiny random DiT (tests/conftest.py)
    assert set(summary.inputs) == {"x", "t", "y"} and summary.input_dtypes["y"] == "INT64"
    assert (summary.precision, summary.precision_source) == ("fp32", "metadata")
    shapes = profile_shapes(summary.inputs, BuildConfig(batch_min=1, batch_opt=4, batch_max=16))
    c = TINY.in_channels, TINY.input_size, TINY.input_size
    assert shapes["x"].min == (1, *c) and shapes["x"].opt == (8, *c) and shapes["x"].max == (32, *c)
    assert shapes["t"].max == (32,) and shapes["y"].max == (32,)


@pytest.mark.skipif(
    tensorrt_available()[0], reason="TensorRT and a GPU are present: the build would succeed (see tests/tensorrt)"
)
def test_build_of_an_exported_graph_without_tensorrt(exported, tmp_path):
    result = CliRunner().invoke(main, ["build", "--onnx", str(exported("tiny")), "--out", str(tmp_path / "m.plan")])
    assert result.exit_code == 2 and result.output.startswith("ditrt: error: ")
    assert "TensorRT" in result.output or "GPU" in result.output
    assert list(tmp_path.iterdir()) == []
