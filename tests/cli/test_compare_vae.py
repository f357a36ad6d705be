"""`ditrt compare --vae`: a latent graph against its float model, also as decoded images (a small random
diffusers AutoencoderKL, saved and loaded offline), with --device."""

import json

from click.testing import CliRunner

from ditrt.cli import main


def test_compare_a_latent_graph_as_decoded_images(tiny_artifacts, vae_dir):
    ckpt, graph = tiny_artifacts["ckpt"], tiny_artifacts["onnx"]  # the tiny latent DiT and its float graph (tests/conftest.py)
    args = ["compare", "--model", str(ckpt), "--onnx", str(graph), "--steps", "3", "--timesteps", "2", "--device", "cpu"]
    r = CliRunner().invoke(main, [*args, "--vae", str(vae_dir), "--images", "2", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    images = out["images"]
    assert images["images"] == 2 and images["steps"] == "3" and images["vae"] == str(vae_dir)
    # the float graph computes what the float model computes: the decoded images agree to float32 rounding
    assert images["psnr_db"] > 60 and images["latent_rel_l2"] < 1e-4, images
    assert out["passed"]


def test_compare_refuses_a_vae_that_is_not_a_folder_before_any_work(tmp_path, tiny_ckpt):
    r = CliRunner().invoke(main, ["compare", "--model", str(tiny_ckpt), "--onnx", str(tiny_ckpt), "--vae", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "not a diffusers AutoencoderKL folder" in r.output and "Traceback" not in r.output
