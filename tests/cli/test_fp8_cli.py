"""The command line at precision fp8: `ditrt calibrate --precision fp8` with every method writes an fp8
recipe (GPTQ onto the FP8 grid too), and what has no FP8 form is refused in one line before any work."""

import json

import pytest
from click.testing import CliRunner

from ditrt.cli import main
from ditrt.contracts.recipe import METHODS

FAST = ("--calib-steps", "10", "--calib-timesteps", "2", "--calib-samples", "2", "--device", "cpu")


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize(("args", "message"), [
    (["--reconstruct"], "block reconstruction learns roundings on integer grids only"),
    (["--asymmetric"], "fp8 has no zero points (FP8 quantizers are symmetric); drop --asymmetric"),
    (["--block-size", "128"], "--block-size is for block-wise INT4 weights"),
])  # fmt: skip
def test_what_fp8_cannot_do_is_one_line_before_any_work(tmp_path, args, message):
    out = tmp_path / "r"
    r = run("calibrate", "--model", "builtin", "--precision", "fp8", *args, "--out", out)
    assert r.exit_code == 2, r.output + r.stderr
    assert r.stderr.startswith("ditrt: error: ") and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
    assert not out.exists()


def test_every_method_calibrates_at_fp8(tiny_ckpt, tmp_path):
    for method in METHODS:
        out = tmp_path / method
        r = run("calibrate", "--model", tiny_ckpt, "--method", method, "--precision", "fp8", *FAST, "--out", out)
        assert r.exit_code == 0, (method, r.output + r.stderr)
        recipe = json.loads((out / "recipe.json").read_text())
        assert (recipe["precision"], recipe["weight_granularity"], recipe["deployable"]) == ("fp8", "tensor", True), method
    gptq = tmp_path / "gptq"
    r = run("calibrate", "--model", tiny_ckpt, "--method", "ptq4dit", "--precision", "fp8", "--weights", "gptq", *FAST, "--out", gptq)
    assert r.exit_code == 0, r.output + r.stderr
    assert json.loads((gptq / "recipe.json").read_text())["weight_rounding"] == "gptq"
