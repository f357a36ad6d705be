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
