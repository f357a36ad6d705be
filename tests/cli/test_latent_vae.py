"""The DiT-XL/2 user's path in miniature: a random 4-channel latent DiT and a small random diffusers
AutoencoderKL (saved locally, loaded offline), through `ditrt sample` of every artifact and the pipeline."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from ditrt.cli import main


def test_sample_a_latent_graph_and_decode_it_with_a_local_vae(tmp_path, tiny_artifacts, vae_dir, monkeypatch):
    import ditrt.runtime.vae as vae_module

    loads = []
    real = vae_module.load_vae
    monkeypatch.setattr(vae_module, "load_vae", lambda *a, **kw: loads.append(a) or real(*a, **kw))
    graph = tiny_artifacts["onnx"]  # the tiny latent DiT's float graph (tests/conftest.py)
    r = CliRunner().invoke(main, ["sample", str(graph), "--vae", str(vae_dir), "--steps", "3", "--num", "3",
                                  "--batch-size", "1", "--out", str(tmp_path / "s")])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert loads == [(vae_dir, "cpu")]  # once for the run's three chunks
    z = np.load(tmp_path / "s" / "samples.npz")
    assert z["images"].shape == (3, 3, 16, 16) and np.isfinite(z["images"]).all()  # 8x8 latents, 2x upsampling VAE
    assert json.loads(str(z["settings"]))["backend"] == "onnxruntime" and (tmp_path / "s" / "samples.png").exists()


def test_the_pipeline_decodes_a_latent_models_samples_and_draws_them(tmp_path, tiny_ckpt, vae_dir):
    fast = ["--steps", "3", "--num", "2", "--calib-timesteps", "2", "--calib-samples", "2", "--calib-steps", "5", "--device", "cpu"]
    r = CliRunner().invoke(main, ["pipeline", "--model", str(tiny_ckpt), *fast, "--vae", str(vae_dir), "--json",
                                  "--out", str(tmp_path / "p")])  # fmt: skip
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert "comparison.png" in report["files"] and (tmp_path / "p" / "comparison.png").exists()
    assert "psnr_db" in report["quality"], report["quality"]
    assert report["quality"]["measured_on"] == "decoded images" and "ditrt evaluate" in report["quality"]["absent"]["fid"]


def test_the_vae_decodes_any_batching_alike_and_bad_folders_are_one_line_errors(tmp_path, vae_dir):
    from ditrt.contracts.errors import CheckpointError
    from ditrt.runtime.vae import decode_latents, load_vae

    latents = np.random.default_rng(0).standard_normal((3, 4, 8, 8)).astype(np.float32)
    decode = load_vae(vae_dir, "cpu", batch_size=2)
    images = decode(latents)
    assert images.shape == (3, 3, 16, 16) and images.dtype == np.float32 and np.abs(images).max() <= 1
    np.testing.assert_allclose(decode_latents(latents[2:], vae_dir), images[2:], rtol=0, atol=1e-5)  # batches of 2 or 1
    with pytest.raises(CheckpointError, match="is not a diffusers AutoencoderKL folder"):
        load_vae(tmp_path, "cpu")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="could not load the VAE from") as e:
        load_vae(tmp_path, "cpu")
    assert "\n" not in str(e.value)
