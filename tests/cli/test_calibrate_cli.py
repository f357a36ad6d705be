"""ditrt calibrate: the shared calibration options, validated before any work (one line, exit 2, no
output folder), on a tiny random 4-channel DiT."""

import json

import pytest
from click.testing import CliRunner

from ditrt.cli import main
from ditrt.cli.calibration_options import OPTION_NAMES, calibrate_config_from_options
from tests.conftest import TINY

FAST = ["--calib-timesteps", "2", "--calib-samples", "2", "--calib-steps", "5"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize(
    "args,message",
    [
        (["--method", "ptq4dit", "--alpha", "0.3"], "--alpha is a smoothquant setting"),
        (["--method", "minmax", "--qdit-budget", "70"], "--qdit-budget is a qdit setting"),
        (["--method", "ptq4dit", "--qdit-fitness", "proxy"], "--qdit-fitness is a qdit setting"),
        (["--method", "qdit", "--qdit-choices", "32"], "--qdit-choices takes 64,128,channel"),
        (["--method", "qdit", "--precision", "w8a8", "--qdit-fitness", "proxy"], "no granularity to search at w8a8"),
        (["--method", "smoothquant", "--alpha", "2"], "alpha must lie in [0, 1]"),
        (["--calib-timesteps", "0"], "--calib-timesteps must be a positive count"),
        (["--calib-samples", "-1"], "--calib-samples must be a positive count"),
        (["--calib-steps", "abc"], "--calib-steps: invalid step count"),
        (["--calib-cfg-scale", "0.5"], "--calib-cfg-scale must be >= 1.0"),
        (["--timestep-groups", "0"], "--timestep-groups must be between 1 and the 2 recorded"),
        (["--timestep-groups", "3"], "--timestep-groups must be between 1 and the 2 recorded"),
        (["--calib-steps", "5", "--calib-timesteps", "9", "--timestep-groups", "6"], "between 1 and the 5 recorded"),
        (["--precision", "w4a16", "--timestep-groups", "2"], "w4a16 does not quantize activations"),
        (["--precision", "w4a16", "--dynamic-activations"], "w4a16 does not quantize activations"),
        (["--precision", "w4a16", "--act-search", "mse"], "--act-search has no effect"),
        (["--precision", "w4a16", "--block-size", "32"], "Invalid value for '--block-size'"),
        (["--precision", "w8a8", "--block-size", "128"], "--block-size is for block-wise INT4 weights"),
        (["--scale-search", "mse", "--weight-search", "minmax"], "--scale-search sets both"),
        (["--scale-search", "mse", "--act-search", "minmax"], "--scale-search sets both"),
        (["--reconstruct-iters", "5"], "--reconstruct-iters 5 needs --reconstruct"),
        (["--reconstruct", "--reconstruct-iters", "0"], "needs --reconstruct and a positive count"),
        (["--steps", "5", "--calib-steps", "5"], "--steps is the deprecated spelling of --calib-steps"),
        (["--method", "gptq"], "Invalid value for '--method'"),
        (["--device", "tpu"], "--device takes auto, cpu or cuda"),
    ],
)
def test_bad_options_are_one_line_before_any_work(tmp_path, args, message):
    out = tmp_path / "r"
    r = run("calibrate", "--model", "builtin", "--calib-timesteps", "2", *args, "--out", out)
    assert r.exit_code == 2, r.output + r.stderr
    assert message in r.stderr, r.stderr
    if "Invalid value" not in message:  # click's own usage errors say more lines; ours are one
        assert r.stderr.startswith("ditrt: error: ") and r.stderr.count("\n") == 1, r.stderr
    assert not out.exists()


def test_out_must_be_a_writable_folder(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    for out, message in ((f, "is a file, but a folder is written there"), (f / "r", "lies under")):
        r = run("calibrate", "--model", "builtin", *FAST, "--out", out)
        assert r.exit_code == 2 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert f.read_text() == "x"


def test_searches_and_settings_reach_the_recipe(tiny_ckpt, tmp_path):
    r = run("calibrate", "--model", tiny_ckpt, "--method", "smoothquant", "--alpha", "0.3", "--weight-search", "percentile",
            *FAST, "--device", "cpu", "--out", tmp_path / "a")  # fmt: skip
    assert r.exit_code == 0, r.output + r.stderr
    recipe = json.loads((tmp_path / "a" / "recipe.json").read_text())
    assert (recipe["alpha"], recipe["scale_search"], recipe["act_scale_search"]) == (0.3, "percentile", "minmax")  # the default
    assert recipe["model_config"]["in_channels"] == 4 and recipe["details"]["balance"]["layers"] == 3 * TINY.depth
    r = run("calibrate", "--model", tiny_ckpt, "--method", "minmax", "--scale-search", "mse", *FAST, "--out", tmp_path / "b")
    assert r.exit_code == 0, r.output + r.stderr
    recipe = json.loads((tmp_path / "b" / "recipe.json").read_text())
    assert (recipe["scale_search"], recipe["act_scale_search"]) == ("mse", "mse")


def test_deprecated_calibration_spellings_make_the_same_recipe(tiny_ckpt, tmp_path):
    new = run("calibrate", "--model", tiny_ckpt, *FAST, "--calib-seed", "3", "--out", tmp_path / "new")
    old = run("calibrate", "--model", tiny_ckpt, "--calib-timesteps", "2", "--calib-samples", "2", "--steps", "5", "--seed", "3",
              "--out", tmp_path / "old")  # fmt: skip
    assert new.exit_code == 0 and old.exit_code == 0, old.stderr
    assert "--steps is deprecated here, use --calib-steps" in old.stderr
    for f in ("recipe.json", "weights.safetensors"):
        assert (tmp_path / "new" / f).read_bytes() == (tmp_path / "old" / f).read_bytes()


def test_every_option_has_help_and_the_library_defaults():
    cmd = main.commands["calibrate"]
    params = {p.name: p for p in cmd.params}
    assert set(OPTION_NAMES) <= set(params)
    assert all(params[n].help for n in OPTION_NAMES)
    from ditrt.calibrate.config import CalibrateConfig

    assert calibrate_config_from_options() == CalibrateConfig()
