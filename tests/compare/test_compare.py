import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ditrt.cli import main
from ditrt.compare.accuracy import compare_runners, output_stats
from ditrt.compare.inputs import load_feeds, record_feeds, save_feeds
from ditrt.compare.runners import DenoiserRunner

SHAPE = (1, 8, 8)
POLYGRAPHY = str(Path(sys.executable).with_name("polygraphy"))  # the console script installed beside this python


@pytest.fixture(scope="module")
def model(models):
    """A random DiT of the built-in model's shape (the suite's: tests/conftest.py, with its checkpoint and graph)."""
    return models["digits"]


@pytest.fixture(scope="module")
def ckpt(digits_ckpt):
    return digits_ckpt


def test_output_stats_on_known_values():
    a = np.array([3.0, 4.0])
    s = output_stats(a, a + np.array([0.0, 0.5]))
    assert s["max_abs"] == 0.5 and s["rel_l2"] == pytest.approx(0.1) and s["snr_db"] == pytest.approx(20.0)
    assert output_stats(a, a)["snr_db"] == 200.0 and output_stats(a, -a)["cosine"] == pytest.approx(-1.0)


def test_feeds_are_real_sampler_inputs_and_round_trip_polygraphy_files(model, tmp_path):
    feeds = record_feeds(model, steps="10", timesteps=3, samples=2, pixel_space=True)
    assert len(feeds) == 3 and feeds[0]["y"].dtype == np.int64 and feeds[0]["x"].shape == (4, 1, 8, 8)
    assert (feeds[0]["y"][2:] == 10).all() and feeds[0]["t"][0] == 999.0
    save_feeds(feeds, tmp_path / "in.json")
    back = load_feeds(tmp_path / "in.json")
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(feeds, back) for k in "xty")


def test_comparator_sees_a_perturbed_denoiser(model):
    feeds = record_feeds(model, steps="10", timesteps=2, samples=2, pixel_space=True)
    ref = DenoiserRunner(model, image_shape=SHAPE, name="ref")
    same = compare_runners(ref, DenoiserRunner(model, image_shape=SHAPE, name="same"), feeds)
    assert same["passed"] and same["outputs"]["out"]["rel_l2"] == 0.0

    def noisy(x, t, y):
        out = model(x, t, y)
        return out + 0.05 * out.abs().mean() * torch.randn(out.shape, generator=torch.Generator().manual_seed(0))

    diff = compare_runners(ref, DenoiserRunner(noisy, image_shape=SHAPE, name="noisy"), feeds)
    assert not diff["passed"] and 0.01 < diff["outputs"]["out"]["rel_l2"] < 0.5 and len(diff["per_feed"]) == 2


def test_cli_compare_onnx_vs_torch_and_per_layer_json(ckpt, exported, tmp_path):
    onnx_path = exported("digits")  # the float32 graph of `model`
    r = CliRunner().invoke(main, ["compare", "--model", str(ckpt), "--onnx", str(onnx_path), "--steps", "10", "--timesteps", "2",
                                  "--json", "--save-inputs", str(tmp_path / "inputs.json")])  # fmt: skip
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["comparisons"][0]["outputs"]["out"]["rel_l2"] < 1e-3 and res["comparisons"][0]["passed"]
    # the saved inputs drive plain `polygraphy run` on the same graph
    p = subprocess.run([POLYGRAPHY, "run", str(onnx_path), "--onnxrt", "--load-inputs", str(tmp_path / "inputs.json")],
                       capture_output=True, text=True)  # fmt: skip
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    r = CliRunner().invoke(main, ["compare", "--model", str(ckpt), "--onnx", str(onnx_path), "--reference-onnx", str(onnx_path),
                                  "--per-layer", "--load-inputs", str(tmp_path / "inputs.json")])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "first node over 0.01: none" in r.output and "tensors compared" in r.output


def test_polygraphy_run_with_the_shipped_data_loader(exported):
    """The loader's inputs (the built-in model's own sampling run) fit a graph of the built-in model's shape."""
    import ditrt.compare.polygraphy_data_loader as loader

    p = subprocess.run([POLYGRAPHY, "run", str(exported("digits")), "--onnxrt", "--data-loader-script", loader.__file__],
                       capture_output=True, text=True)  # fmt: skip
    assert p.returncode == 0 and "PASSED" in p.stdout + p.stderr, p.stdout[-2000:] + p.stderr[-2000:]
