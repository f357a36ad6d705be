import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from ditrt.cli import main
from ditrt.contracts.model_config import CONFIGS
from ditrt.models.checkpoints import save_ditrt_checkpoint
from tests.conftest import random_dit


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory):
    p = tmp_path_factory.mktemp("ckpt") / "digits.safetensors"
    save_ditrt_checkpoint(random_dit(CONFIGS["ditrt-digits"], std=0.02), p)
    return p


def test_sample_writes_grid_and_npz_then_evaluate_json(tmp_path):
    r = run("sample", "--model", "builtin", "--steps", "20", "--num", "6", "--classes", "0,3,7", "--seed", "3", "--out", tmp_path)
    assert r.exit_code == 0, r.output
    z = np.load(tmp_path / "samples.npz")
    assert z["images"].shape == (6, 1, 8, 8) and z["labels"].tolist() == [0, 3, 7, 0, 3, 7]
    assert z["seeds"].tolist() == [3, 4, 5, 6, 7, 8]
    settings = json.loads(str(z["settings"]))
    assert settings["sampler"]["steps"] == "20" and settings["sampler"]["cfg_scale"] == 1.5
    img = Image.open(tmp_path / "samples.png")
    assert img.width > 100 and img.height > 3 * 24  # three labelled rows
    r = run("evaluate", tmp_path / "samples.npz", "--reference", tmp_path / "samples.npz", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert set(res) >= {"fd", "fd_floor", "class_accuracy", "psnr_db"}
    assert res["psnr_db"] == 200.0 and res["fd_floor"] > 0


def test_same_seeds_reproduce_the_same_samples(tmp_path, digits_ckpt):
    for d in ("a", "b"):
        assert run("sample", "--model", digits_ckpt, "--steps", "10", "--num", "3", "--out", tmp_path / d).exit_code == 0
    a, b = np.load(tmp_path / "a" / "samples.npz"), np.load(tmp_path / "b" / "samples.npz")
    assert np.array_equal(a["images"], b["images"])


@pytest.mark.parametrize(
    "args,message",
    [
        (["--classes", "3,10"], "class id 10 is out of range: this model has classes 0..9"),
        (["--steps", "0"], "invalid step count '0'"),
        (["--steps", "-3"], "invalid step count"),
        (["--num", "0"], "--num must be positive"),
        (["--classes", "a,b"], "--classes must be comma-separated"),
        (["--cfg-scale", "0.5"], "cfg scale must be >= 1.0"),
    ],
)
def test_bad_sampling_input_is_one_line_and_leaves_nothing(tmp_path, digits_ckpt, args, message):
    r = CliRunner().invoke(main, ["sample", "--model", str(digits_ckpt), "--out", str(tmp_path / "o"), *args])
    assert r.exit_code == 2 and message in r.output
    assert len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "o" / "samples.npz").exists()


def test_bad_checkpoints_fail_in_a_real_process_with_one_line(tmp_path):
    cut = tmp_path / "cut.pt"
    torch.save(random_dit(CONFIGS["ditrt-digits"]).state_dict(), tmp_path / "ok.pt")
    cut.write_bytes((tmp_path / "ok.pt").read_bytes()[:5000])
    foreign = tmp_path / "foreign.pt"
    torch.save({"encoder.weight": torch.zeros(3, 3)}, foreign)
    for path, message in [(cut, "truncated"), (foreign, "not a DiT checkpoint"), (tmp_path / "none.pt", "does not exist")]:
        p = subprocess.run(
            [sys.executable, "-m", "ditrt", "sample", "--model", str(path), "--out", str(tmp_path / "o")], capture_output=True, text=True
        )
        assert p.returncode == 2, p.stderr
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("ditrt: error:") and message in lines[0]
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_evaluate_refuses_unpaired_reference_and_missing_files(tmp_path, digits_ckpt):
    run("sample", "--model", digits_ckpt, "--steps", "5", "--num", "2", "--seed", "0", "--out", tmp_path / "a")
    run("sample", "--model", digits_ckpt, "--steps", "5", "--num", "2", "--seed", "1", "--out", tmp_path / "b")
    r = CliRunner().invoke(main, ["evaluate", str(tmp_path / "a" / "samples.npz"), "--reference", str(tmp_path / "b" / "samples.npz")])
    assert r.exit_code == 2 and "same seeds and labels" in r.output
    r = CliRunner().invoke(main, ["evaluate", str(tmp_path / "missing.npz")])
    assert r.exit_code == 2 and "does not exist" in r.output


def test_help_works():
    assert "sample" in run("--help").output


# ---------------------------------------------------------------- ditrt sample ARTIFACT (any model, any backend)


@pytest.fixture(scope="module")
def latent(tiny_artifacts):
    """The tiny 4-channel (DiT-XL/2-style latent) model as a checkpoint, a recipe folder and an exported graph."""
    return tiny_artifacts


def _settings(out):
    return json.loads(str(np.load(out / "samples.npz")["settings"]))


def test_sample_a_graph_of_a_non_builtin_model_with_no_other_option(tmp_path, latent):
    r = run("sample", latent["onnx"], "--steps", "5", "--num", "2", "--out", tmp_path / "g")
    assert r.exit_code == 0, r.output
    z = np.load(tmp_path / "g" / "samples.npz")
    assert z["latents"].shape == (2, 4, 8, 8)
    s = _settings(tmp_path / "g")
    assert (s["artifact"], s["backend"], s["recipe"], s["model"]) == (str(latent["onnx"]), "onnxruntime", None, None)
    assert s["model_config"]["in_channels"] == 4
    assert run("sample", latent["ckpt"], "--steps", "5", "--num", "2", "--out", tmp_path / "t").exit_code == 0
    torch_latents = np.load(tmp_path / "t" / "samples.npz")["latents"]
    assert np.abs(z["latents"] - torch_latents).max() <= 1e-3 * np.abs(torch_latents).max()  # same seeds: the same samples
    old = run("sample", "--onnx", latent["onnx"], "--steps", "5", "--num", "2", "--out", tmp_path / "o")  # the option form still works
    assert old.exit_code == 0 and np.array_equal(np.load(tmp_path / "o" / "samples.npz")["latents"], z["latents"])


def test_sample_a_recipe_folder_without_its_model_records_the_recipe(tmp_path, latent):
    assert run("sample", latent["recipe"], "--steps", "5", "--num", "2", "--out", tmp_path / "a").exit_code == 0
    r = run("sample", "--model", latent["ckpt"], "--recipe", latent["recipe"], "--steps", "5", "--num", "2", "--out", tmp_path / "b")
    assert r.exit_code == 0, r.output
    a, b = np.load(tmp_path / "a" / "samples.npz"), np.load(tmp_path / "b" / "samples.npz")
    assert np.array_equal(a["latents"], b["latents"])
    s = _settings(tmp_path / "b")
    assert (s["recipe"], s["model"], s["backend"], s["precision"]) == (str(latent["recipe"]), str(latent["ckpt"]), "torch", "w8a8")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--onnx", "{onnx}", "--recipe", "{recipe}"], "the graph already carries the recipe"),
        (["{onnx}", "--recipe", "{recipe}"], "the graph already carries the recipe"),
        (["{onnx}", "--model", "{ckpt}"], "--model does not apply to"),
        (["{onnx}", "--config", "DiT-S/2"], "--config does not apply to"),
        (["{recipe}", "--config", "DiT-S/2"], "a recipe records its model config"),
        (["{ckpt}", "--onnx", "{onnx}"], "sample one artifact at a time"),
        (["{onnx}", "--backend", "torch"], "--backend torch disagrees with"),
        (["--engine", "{onnx}"], "is not a .plan/.engine or an engine .groups.json"),
        (["--recipe", "{onnx}"], "is not a recipe folder"),
        (["{onnx}", "--batch-size", "0"], "--batch-size must be a positive number"),
        (["{onnx}", "--batch-size", "-2"], "--batch-size must be a positive number"),
        (["{onnx}", "--num", "0"], "--num must be positive"),
        (["{onnx}", "--steps", "abc"], "invalid step count"),
        (["{onnx}", "--classes", "3,10"], "class id 10 is out of range: this model has classes 0..9"),
        (["{onnx}", "--vae", "{ckpt}"], "is not a diffusers AutoencoderKL folder"),
        (["builtin", "--vae", "{recipe}"], "is not a diffusers AutoencoderKL folder"),
    ],
)
def test_contradictory_or_ignored_options_are_one_line_errors_before_work(tmp_path, latent, args, message):
    args = [a.format(**latent) for a in args]
    r = CliRunner().invoke(main, ["sample", "--steps", "5", "--num", "2", *args, "--out", str(tmp_path / "o")])  # later values win
    assert r.exit_code == 2 and message in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_vae_is_refused_for_a_pixel_model(tmp_path):
    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / "config.json").write_text("{}")
    r = CliRunner().invoke(main, ["sample", "--vae", str(vae), "--steps", "5", "--num", "2", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "--vae decodes 4-channel latents" in r.output and not (tmp_path / "o").exists()


def test_bad_steps_are_refused_before_the_model_is_loaded(tmp_path):
    r = CliRunner().invoke(main, ["sample", str(tmp_path / "missing.safetensors"), "--steps", "abc", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "invalid step count" in r.output


def test_batch_size_follows_and_is_checked_against_the_backend_limit(tmp_path, latent, monkeypatch):
    """An artifact whose backend takes at most 6 rows per call (an engine's profile): 3 images with guidance."""
    import ditrt.runtime.open as open_module

    real = open_module.open_denoiser
    batches = []

    def limited(*a, **kw):
        opened = real(*a, **kw)
        inner = opened.denoiser
        opened.denoiser = lambda x, t, y: batches.append(x.shape[0]) or inner(x, t, y)
        opened.max_rows = 6
        return opened

    monkeypatch.setattr(open_module, "open_denoiser", limited)
    r = run("sample", latent["onnx"], "--steps", "5", "--num", "5", "--out", tmp_path / "a")
    assert r.exit_code == 0, r.output
    assert max(batches) == 6 and set(batches) == {6, 4}  # 3 + 2 images, doubled for guidance
    r = CliRunner().invoke(main, ["sample", str(latent["onnx"]), "--batch-size", "4", "--num", "5", "--out", str(tmp_path / "b")])
    assert r.exit_code == 2 and "at most 3 images per call with guidance (6 rows)" in r.output and not (tmp_path / "b").exists()


def test_a_model_without_a_null_class_samples_unguided_and_refuses_guidance(tmp_path):
    """A checkpoint trained without label dropout has no null-class row: guidance is refused in one line
    (it would index past the label table), and --cfg-scale 1 samples every class."""
    from dataclasses import replace

    cfg = replace(CONFIGS["ditrt-digits"], class_dropout_prob=0.0)
    p = tmp_path / "no-null.safetensors"
    save_ditrt_checkpoint(random_dit(cfg, std=0.02), p)
    r = CliRunner().invoke(main, ["sample", str(p), "--steps", "5", "--num", "2", "--out", str(tmp_path / "g")])
    assert r.exit_code == 2 and "no null class" in r.output and "--cfg-scale 1" in r.output, r.output
    assert not (tmp_path / "g" / "samples.npz").exists()
    r = run("sample", p, "--steps", "5", "--num", "2", "--classes", "9", "--cfg-scale", "1", "--out", tmp_path / "u")
    assert r.exit_code == 0, r.output
    assert np.load(tmp_path / "u" / "samples.npz")["labels"].tolist() == [9, 9]


def test_head_and_class_counts_of_a_bare_official_checkpoint_come_from_the_options(tmp_path):
    """An official-layout .pt records no config; a hidden size no named config has needs --num-heads,
    and the options reach the loader through `ditrt sample` and `ditrt export` alike."""
    from tests.conftest import TINY

    p = tmp_path / "tiny.pt"
    torch.save(random_dit(TINY).state_dict(), p)
    r = CliRunner().invoke(main, ["sample", str(p), "--steps", "3", "--num", "2", "--out", str(tmp_path / "a")])
    assert r.exit_code == 2 and "--num-heads" in r.output, r.output
    r = run("sample", p, "--num-heads", "4", "--num-classes", "10", "--steps", "3", "--num", "2", "--out", tmp_path / "b")
    assert r.exit_code == 0, r.output
    assert np.load(tmp_path / "b" / "samples.npz")["latents"].shape == (2, 4, 8, 8)
    r = CliRunner().invoke(main, ["export", "--model", str(p), "--num-heads", "3", "--out", str(tmp_path / "m.onnx")])
    assert r.exit_code == 2 and "divide" in r.output, r.output  # 3 heads do not divide hidden 64
    r = run("export", "--model", p, "--num-heads", "4", "--out", tmp_path / "m.onnx")
    assert r.exit_code == 0, r.output
