"""The one-shot pipeline end to end on the ONNX Runtime path (no TensorRT here)."""

import json

import pytest
from click.testing import CliRunner
from PIL import Image

from ditrt.cli import main
from ditrt.engines.build import tensorrt_available


@pytest.mark.slow  # tens of seconds (two exports of the built-in model); tests/cli/test_pipeline_cli.py runs a tiny model
def test_pipeline_on_the_builtin_model_writes_report_and_pictures(tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["pipeline", "--model", "builtin", "--method", "ptq4dit", "--precision", "w8a8", "--steps", "20",
                                  "--num", "10", "--calib-timesteps", "4", "--calib-samples", "4", "--calib-steps", "50",
                                  "--out", str(out)])  # fmt: skip
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


@pytest.mark.parametrize("cfg_scale", [1.5, 1.0])
@pytest.mark.parametrize("num, batch_size", [(1, 256), (2, 256), (3, 256), (10, 4), (7, 3)])
def test_the_pipeline_engine_takes_every_call_the_run_makes(tmp_path, num, batch_size, cfg_scale):
    """The engine the pipeline builds (its BuildConfig -> the profile of a real ONNX graph's inputs ->
    the sidecar, saved and read back as the runtime reads it) takes every sampling chunk and the
    comparison inputs, and the chunk size read back from that profile never exceeds its rows."""
    from ditrt.contracts.files import onnx_sha256
    from ditrt.contracts.profile import profile_shapes, profile_to_dict, rows_per_image
    from ditrt.contracts.sidecar import load_sidecar, make_sidecar, save_sidecar
    from ditrt.engines.onnx_info import read_onnx
    from ditrt.pipeline import PipelineConfig, engine_build_config, sampling_batch
    from tests.engines.conftest import write_tiny_onnx

    config = PipelineConfig(num=num, batch_size=batch_size, cfg_scale=cfg_scale)
    build = engine_build_config(config, feed_rows=8)  # record_feeds: 4 samples and their null-class rows
    graph = write_tiny_onnx(tmp_path / "m.onnx")
    shapes = profile_shapes(read_onnx(graph).inputs, build)
    engine = tmp_path / "m.plan"
    engine.write_bytes(b"no engine: only its sidecar is read")
    save_sidecar(make_sidecar(tensorrt_version="10.13", gpu_name="g", compute_capability=(9, 0), onnx_path=graph, onnx_sha256=onnx_sha256(graph),
                              engine_sha256="0", precision="w8a8", profile=profile_to_dict(shapes), build=build.to_dict()), engine)  # fmt: skip
    sidecar = load_sidecar(engine)
    batch = sampling_batch(config, max_rows=sidecar.max_batch, min_rows=sidecar.min_batch)
    k = rows_per_image(cfg_scale != 1.0)
    chunks = [min(batch, num - s) for s in range(0, num, batch)]
    assert batch == min(num, batch_size) and shapes["x"].opt[0] == k * batch  # the profile is tuned for the calls that repeat
    assert all(sidecar.min_batch <= k * c <= sidecar.max_batch for c in chunks) and 8 <= sidecar.max_batch


def test_the_chunk_size_follows_an_engines_profile():
    from ditrt.contracts.errors import ConfigError
    from ditrt.pipeline import PipelineConfig, sampling_batch

    assert sampling_batch(PipelineConfig(num=100, batch_size=256), max_rows=16) == 8  # guidance: 2 rows per image
    assert sampling_batch(PipelineConfig(num=100, batch_size=256, cfg_scale=1.0), max_rows=16) == 16
    assert sampling_batch(PipelineConfig(num=5, batch_size=256), max_rows=None) == 5  # ONNX Runtime: any batch
    with pytest.raises(ConfigError, match="guidance needs 2 rows"):
        sampling_batch(PipelineConfig(num=5), max_rows=1)
