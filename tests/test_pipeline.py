"""The one-shot pipeline end to end on the ONNX Runtime path (no TensorRT here)."""

import json

import pytest
from click.testing import CliRunner
from PIL import Image

from ditrt.cli import main
from ditrt.engines.build import tensorrt_available


@pytest.mark.slow  # about 30 s on 2 shared cores; tests/cli/test_pipeline_cli.py runs a tiny model in seconds
def test_pipeline_on_the_builtin_model_writes_report_and_pictures(tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["pipeline", "--model", "builtin", "--method", "ptq4dit", "--precision", "w8a8", "--steps", "20",
                                  "--num", "10", "--calib-timesteps", "4", "--calib-samples", "4", "--out", str(out)])  # fmt: skip
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    if not tensorrt_available()[0]:
        assert "running the checked graph with ONNX Runtime" in r.output and r.output.count("ONNX Runtime") == 1
        assert report["tensorrt"]["available"] is False
    assert report["check"]["passed"], report["check"]
    parity = report["compare"]["outputs"]["out"]
    # the graph computes what the recipe simulates; W8A8 rounding flips cascade (see ditrt.pipeline._compare)
    assert parity["rel_l2"] <= 2e-2 and parity["cosine"] > 0.999 and report["compare"]["passed"]
    q = report["quality"]
    assert q["psnr_db"] > 25 and 0 <= q["class_accuracy_quantized"] <= 1 and q["fd_floor"] > 0
    assert report["recipe"]["balanced_layers"] == 18 and report["sizes_bytes"]["onnx"] > 0
    for f in ("report.md", "comparison.png", "recipe/recipe.json", "float/samples.npz", "quantized/samples.npz", "inputs.json"):
        assert (out / f).exists(), f
    assert Image.open(out / "comparison.png").width > Image.open(out / "float" / "samples.png").width
    assert "paired PSNR" in (out / "report.md").read_text()
    assert q["measured_on"] == "pixels" and "comparison.png" in report["files"] and report["check"]["graphs"] == [report["quantized"]["graph"]]


def test_pipeline_refuses_a_simulation_only_precision(tmp_path):
    r = CliRunner().invoke(main, ["pipeline", "--precision", "w4a8", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "w4a8" in r.output
    assert not (tmp_path / "o").exists()
