"""The DiT-XL/2 user's path in miniature: a random 4-channel latent DiT and a small random diffusers
AutoencoderKL (saved locally, loaded offline), through `ditrt sample` of every artifact and the pipeline."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ditrt.cli import main


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8), layers_per_block=1,
                        norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)  # fmt: skip
    path = tmp_path_factory.mktemp("vae") / "vae"
    vae.save_pretrained(str(path))
    return path


def test_sample_a_latent_graph_and_decode_it_with_a_local_vae(tmp_path, tiny_ckpt, vae_dir):
    r = CliRunner().invoke(main, ["export", "--model", str(tiny_ckpt), "--out", str(tmp_path / "m.onnx")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["sample", str(tmp_path / "m.onnx"), "--vae", str(vae_dir), "--steps", "3", "--num", "2",
                                  "--out", str(tmp_path / "s")])  # fmt: skip
    assert r.exit_code == 0, r.output
    z = np.load(tmp_path / "s" / "samples.npz")
    assert z["images"].shape == (2, 3, 16, 16) and np.isfinite(z["images"]).all()  # 8x8 latents, 2x upsampling VAE
    assert json.loads(str(z["settings"]))["backend"] == "onnxruntime" and (tmp_path / "s" / "samples.png").exists()


def test_the_pipeline_decodes_a_latent_models_samples_and_draws_them(tmp_path, tiny_ckpt, vae_dir):
    fast = ["--steps", "3", "--num", "2", "--calib-timesteps", "2", "--calib-samples", "2", "--calib-steps", "5", "--device", "cpu"]
    r = CliRunner().invoke(main, ["pipeline", "--model", str(tiny_ckpt), *fast, "--vae", str(vae_dir), "--json",
                                  "--out", str(tmp_path / "p")])  # fmt: skip
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert "comparison.png" in report["files"] and (tmp_path / "p" / "comparison.png").exists()
    assert "psnr_db" in report["quality"], report["quality"]
