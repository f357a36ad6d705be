"""`ditrt build` and the TensorRT entry points where TensorRT (or a GPU) is absent: one line, no files."""

import importlib.util

import pytest
from click.testing import CliRunner

import ditrt.cli.build_cmd  # noqa: F401  (registers `build` on the group)
from ditrt.cli import main
from ditrt.contracts.errors import MissingDependencyError
from ditrt.contracts.profile import BuildConfig
from ditrt.engines import engine_from_onnx, tensorrt_available

AVAILABLE, WHY = tensorrt_available()
HAS_TRT_MODULE = importlib.util.find_spec("tensorrt") is not None
needs_no_tensorrt = pytest.mark.skipif(
    AVAILABLE, reason="TensorRT and a GPU are present: the build would succeed (see tests/tensorrt)"
)


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


@needs_no_tensorrt
def test_build_without_tensorrt_exits_with_the_install_hint(tmp_path, tiny_onnx):
    out = tmp_path / "out" / "tiny.plan"
    result = CliRunner().invoke(main, ["build", "--onnx", str(tiny_onnx), "--out", str(out), "--batch", "1:2:4"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0] == f"ditrt: error: {WHY}"
    if not HAS_TRT_MODULE:
        assert "TensorRT is not installed" in lines[0] and "pip install tensorrt-cu12" in lines[0] and "NGC" in lines[0]
    assert not out.exists() and not out.with_name("tiny.plan.json").exists()
    assert not out.parent.exists() or _files(out.parent) == []  # no temp files either
    assert _files(tmp_path) in (["tiny.onnx"], ["out", "tiny.onnx"])


@needs_no_tensorrt
def test_engine_from_onnx_without_tensorrt_raises_and_writes_nothing(tmp_path, tiny_onnx):
    with pytest.raises(MissingDependencyError) as e:
        engine_from_onnx(tiny_onnx, tmp_path / "tiny.plan", BuildConfig())
    assert str(e.value) == WHY and "\n" not in WHY
    assert _files(tmp_path) == ["tiny.onnx"]


@needs_no_tensorrt
def test_tensorrt_denoiser_without_tensorrt_says_why(tmp_path):
    from ditrt.runtime.tensorrt_backend import TensorRTDenoiser

    with pytest.raises(MissingDependencyError) as e:
        TensorRTDenoiser(tmp_path / "m.plan")
    assert "TensorRT" in str(e.value) or "GPU" in str(e.value)


def test_tensorrt_available_gives_a_reason():
    ok, why = tensorrt_available()
    assert isinstance(ok, bool) and why and "\n" not in why
    if not ok:
        assert "TensorRT" in why or "GPU" in why


@pytest.mark.parametrize("batch, message", [("1:8", "MIN:OPT:MAX"), ("8:4:16", "MIN <= OPT <= MAX"), ("x", "whole numbers")])
def test_bad_batch_is_one_line_before_anything_else(tmp_path, tiny_onnx, batch, message):
    result = CliRunner().invoke(main, ["build", "--onnx", str(tiny_onnx), "--out", str(tmp_path / "m.plan"), "--batch", batch])
    assert result.exit_code == 2
    assert result.output.startswith("ditrt: error: --batch") and message in result.output
    assert _files(tmp_path) == ["tiny.onnx"]


def test_missing_onnx_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(main, ["build", "--onnx", str(tmp_path / "none.onnx"), "--out", str(tmp_path / "m.plan")])
    assert result.exit_code == 2 and "does not exist" in result.output
    assert _files(tmp_path) == []


def test_build_help_works_anywhere():
    result = CliRunner().invoke(main, ["build", "--help"])
    assert result.exit_code == 0
    for option in ("--onnx", "--out", "--batch", "--opt-level", "--timing-cache", "--no-cfg", "--workspace", "--device"):
        assert option in result.output


@pytest.fixture
def group_manifest(tmp_path):
    """A real two-group ONNX manifest (two tiny graphs beside it), as `ditrt export` writes one."""
    from ditrt.contracts.groups import write_manifest
    from tests.engines.conftest import write_tiny_onnx

    graphs = [write_tiny_onnx(tmp_path / f"m.g{g}.onnx") for g in range(2)]
    return write_manifest(tmp_path / "m.onnx", (500.0,), graphs, "onnx")


@needs_no_tensorrt
def test_building_a_group_manifest_without_tensorrt_writes_nothing(tmp_path, group_manifest):
    before = _files(tmp_path)
    out = tmp_path / "engines" / "m.plan"
    result = CliRunner().invoke(main, ["build", "--onnx", str(group_manifest), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == f"ditrt: error: {WHY}"
    assert _files(tmp_path) in (before, sorted([*before, "engines"]))
    assert not out.parent.exists() or _files(out.parent) == []


def test_engines_may_not_overwrite_the_onnx_manifest(tmp_path, group_manifest):
    before = _files(tmp_path)
    result = CliRunner().invoke(main, ["build", "--onnx", str(group_manifest), "--out", str(tmp_path / "m.plan")])
    assert result.exit_code == 2
    assert "would overwrite the ONNX manifest" in result.output and "m.trt.plan" in result.output
    assert _files(tmp_path) == before


def test_sampling_with_a_graph_manifest_as_engine_says_what_to_build(tmp_path, group_manifest):
    import ditrt.cli.sample_cmd  # noqa: F401

    result = CliRunner().invoke(main, ["sample", "--engine", str(group_manifest), "--num", "2", "--out", str(tmp_path / "s")])
    assert result.exit_code == 2, result.output
    assert "lists ONNX graphs, not TensorRT engines" in result.output and "ditrt build --onnx M.groups.json" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    "metadata, message",
    [
        ({"ditrt.precision": "w4a8", "ditrt.dtype": "fp32"}, "no TensorRT format"),
        ({"ditrt.precision": "w4a16", "ditrt.dtype": "fp32"}, "--dtype fp16"),
    ],
)
def test_graphs_tensorrt_cannot_run_are_refused_before_tensorrt_is_needed(tmp_path, metadata, message):
    from tests.engines.conftest import write_tiny_onnx

    graph = write_tiny_onnx(tmp_path / "q.onnx", metadata=metadata, weight_dtype="int4")
    result = CliRunner().invoke(main, ["build", "--onnx", str(graph), "--out", str(tmp_path / "q.plan")])
    assert result.exit_code == 2 and message in result.output and len(result.output.strip().splitlines()) == 1
    assert _files(tmp_path) == ["q.onnx"]


@pytest.mark.parametrize("device, message", [("cpu", "TensorRT builds engines on a GPU"), ("gpu0", "TensorRT builds engines on a GPU")])
def test_build_on_a_device_that_is_no_gpu_is_one_line_before_anything_else(tmp_path, tiny_onnx, device, message):
    result = CliRunner().invoke(main, ["build", "--onnx", str(tiny_onnx), "--out", str(tmp_path / "m.plan"), "--device", device])
    assert result.exit_code == 2 and result.output.strip() == f"ditrt: error: --device {device}: {message}; pass auto or cuda[:N]"
    assert _files(tmp_path) == ["tiny.onnx"]


def test_the_build_device_is_checked_by_the_library_too():
    from ditrt.contracts.errors import ConfigError
    from ditrt.engines.build import require_cuda_gpu

    with pytest.raises(ConfigError, match="not cpu; use --device cuda"):
        require_cuda_gpu("cpu")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(MissingDependencyError, match="needs an NVIDIA GPU"):
            require_cuda_gpu("cuda:1")
