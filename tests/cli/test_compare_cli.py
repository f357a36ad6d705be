"""ditrt compare through the CLI: exit codes (0 passed, 1 failed, 2 bad input) and one JSON object on stdout."""

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from ditrt.cli import main
from ditrt.contracts.model_config import CONFIGS
from ditrt.models.checkpoints import save_ditrt_checkpoint
from tests.conftest import random_dit


@pytest.fixture(scope="module")
def files(digits_ckpt, exported, tmp_path_factory):
    """A random DiT of the built-in shape (checkpoint and float graph), another one, and a 4-channel graph
    (the suite's, tests/conftest.py)."""
    other = tmp_path_factory.mktemp("cmp") / "other.safetensors"
    save_ditrt_checkpoint(random_dit(CONFIGS["ditrt-digits"], seed=5, std=0.03), other)
    return {"ckpt": digits_ckpt, "other": other, "onnx": exported("digits"), "latent": exported("tiny")}


def _args(files, *extra):
    return ["compare", "--onnx", str(files["onnx"]), "--steps", "10", "--timesteps", "2", *map(str, extra)]


def test_a_failed_comparison_exits_1_and_json_is_one_object(files):
    r = CliRunner().invoke(main, _args(files, "--model", files["other"], "--json"))
    assert r.exit_code == 1, r.output
    res = json.loads(r.stdout)
    assert res["passed"] is False and res["comparisons"][0]["passed"] is False
    assert res["comparisons"][0]["outputs"]["out"]["rel_l2"] > 0.01


def test_a_passing_comparison_exits_0(files):
    r = CliRunner().invoke(main, _args(files, "--model", files["ckpt"]))
    assert r.exit_code == 0, r.output
    assert "PASSED" in r.stdout and "FAILED" not in r.stdout


def test_in_a_real_process_stdout_is_only_the_json_and_the_exit_code_says_failed(files):
    cmd = [sys.executable, "-m", "ditrt", *_args(files, "--model", files["other"], "--json")]
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 1, p.stderr[-2000:]
    res = json.loads(p.stdout)  # Polygraphy's FAILED lines went to stderr
    assert res["passed"] is False and "FAILED" in p.stderr
    p = subprocess.run([sys.executable, "-m", "ditrt", *_args(files, "--model", files["ckpt"], "--json")], capture_output=True, text=True)
    assert p.returncode == 0 and json.loads(p.stdout)["passed"] is True, p.stderr[-2000:]


def test_any_models_graph_compares_without_model(files):
    """A 4-channel graph against itself: the inputs come from the reference graph, the config from the graph."""
    r = CliRunner().invoke(main, ["compare", "--onnx", str(files["latent"]), "--reference-onnx", str(files["latent"]), "--steps", "5",
                                  "--timesteps", "2", "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["comparisons"][0]["outputs"]["out"]["max_abs"] == 0.0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--timesteps", "0"], "--timesteps must be a positive number"),
        (["--timesteps", "-1"], "--timesteps must be a positive number"),
        (["--timesteps", "20"], "--timesteps 20 is more than the 10 steps"),
        (["--steps", "abc"], "invalid step count"),
        (["--atol", "-1"], "--atol must be >= 0"),
        (["--threshold", "0"], "--threshold must be > 0"),
        (["--load-inputs", "missing.json"], "--load-inputs missing.json does not exist"),
        (["--reference-onnx", "{onnx}", "--recipe", "r"], "two references"),
        (["--reference-onnx", "{latent}"], "are different models"),
    ],
)
def test_bad_options_are_one_line_errors_before_work(files, tmp_path, extra, message):
    extra = [e.format(**files) for e in extra]
    r = CliRunner().invoke(main, [*_args(files), *extra, "--save-inputs", str(tmp_path / "in.json")])
    assert r.exit_code == 2 and message in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "in.json").exists()


def test_the_check_defaults_to_the_precision_registrys_parity_tolerance(tiny_artifacts, exported):
    """A W8A8 graph against its recipe's simulation is judged as the registry says (the mean error within 1e-2:
    INT8 rounding flips cascade through the blocks), and --atol/--rtol/--error-stat override it."""
    from ditrt.contracts.precisions import get_precision

    recipe, graph = tiny_artifacts["recipe"], exported("tiny", "w8a8")  # absmax scales of every Linear of the tiny DiT
    base = ["compare", "--recipe", str(recipe), "--onnx", str(graph), "--steps", "5", "--timesteps", "2", "--json"]
    r = CliRunner().invoke(main, base)
    c = json.loads(r.stdout)["comparisons"][0]
    want = get_precision("w8a8").parity
    assert (c["atol"], c["rtol"], c["error_stat"]) == (want.atol, want.rtol, want.error_stat), c
    assert r.exit_code == (0 if c["passed"] else 1)
    r = CliRunner().invoke(main, [*base, "--atol", "0", "--rtol", "0", "--error-stat", "elemwise"])
    c = json.loads(r.stdout)["comparisons"][0]
    assert (c["atol"], c["rtol"], c["error_stat"]) == (0.0, 0.0, "elemwise")
    assert r.exit_code == (0 if c["passed"] else 1)
