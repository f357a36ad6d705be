"""``torchrun --nproc_per_node 2 -m ditrt calibrate`` (real torchrun, gloo on the CPU) writes exactly the
recipe a single process writes, recipe.json and every tensor, while the ranks share the recording
(chunks of samples), the observation passes (row slices) and the per-layer searches."""

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from ditrt.cli import main
from tests.conftest import run_torchrun

# 12 samples: recording chunks of 8 and 4 (one per rank); 24 rows a step: observation slices of 16 and 8
FAST = ["--calib-steps", "50", "--calib-timesteps", "3", "--calib-samples", "12", "--precision", "w8a8", "--device", "cpu"]


@pytest.mark.parametrize("method", ["ptq4dit", "ditas"])
def test_two_ranks_write_the_single_process_recipe(tiny_ckpt, tmp_path, method):
    args = ["calibrate", "--model", str(tiny_ckpt), "--method", method, *FAST]
    single = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "one")])
    assert single.exit_code == 0, single.output
    r = run_torchrun(2, *args, "--out", tmp_path / "two")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("wrote ") == 1 and "on 2 processes" in r.stdout, r.stdout  # rank 0 alone writes and says so
    assert json.loads((tmp_path / "two" / "recipe.json").read_text()) == json.loads((tmp_path / "one" / "recipe.json").read_text())
    one, two = load_file(tmp_path / "one" / "weights.safetensors"), load_file(tmp_path / "two" / "weights.safetensors")
    assert sorted(one) == sorted(two) and any(k.endswith("input_scale") for k in one)
    different = [k for k in one if not torch.equal(one[k], two[k])]
    assert not different, different


def test_one_named_gpu_for_every_rank_is_refused_before_work(tmp_path, monkeypatch):
    for var, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(var, value)
    r = CliRunner().invoke(main, ["calibrate", "--model", "builtin", "--device", "cuda:1", "--out", str(tmp_path / "r")])
    assert r.exit_code == 2 and "would put every torchrun rank on one GPU; use --device cuda" in r.stderr, r.output
    assert r.stderr.count("\n") == 1 and not (tmp_path / "r").exists()
