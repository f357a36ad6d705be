"""Every command: help on every option, and bad input as one line `ditrt: error: ...`, exit 2, no file."""

import json
import signal
import subprocess
import sys
import time

import click
import numpy as np
import pytest
from click.testing import CliRunner

from ditrt.cli import main


def _commands(group, prefix=()):
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, (*prefix, name))
        else:
            yield " ".join((*prefix, name)), cmd


def test_every_option_of_every_command_has_help():
    missing = [f"{name} {p.name}" for name, cmd in _commands(main) for p in cmd.params
               if isinstance(p, click.Option) and not p.hidden and not (p.help or "").strip()]  # fmt: skip
    assert missing == []
    assert {"check", "export", "build", "evaluate", "pipeline"} <= {n for n, c in _commands(main) if "as_json" in [p.name for p in c.params]}


def test_pipeline_and_calibrate_take_the_same_calibration_options():
    from ditrt.cli.calibration_options import OPTION_NAMES

    params = {name: {p.name: p for p in cmd.params} for name, cmd in _commands(main)}
    for option in OPTION_NAMES:
        a, b = params["calibrate"][option], params["pipeline"][option]
        assert (a.opts, a.default, getattr(a.type, "choices", None)) == (b.opts, b.default, getattr(b.type, "choices", None))
    assert set(params["pipeline"]["method"].type.choices) >= {"minmax", "smoothquant", "ptq4dit", "ditas", "qdit"}


def _one_line_error(r, message):
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ditrt: error:") and message in lines[0], r.output
    assert "Traceback" not in r.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--num", "0"], "--num must be positive"),
        (["--steps", "abc"], "--steps: invalid step count 'abc'"),
        (["--cfg-scale", "0.5"], "cfg scale must be >= 1.0 (1.0 disables guidance), got 0.5"),
        (["--batch-size", "0"], "--batch-size must be a positive"),
        (["--precision", "w4a8"], "w4a8 is a simulation-only precision"),
        (["--dynamic-activations"], "simulation only"),
        (["--calib-timesteps", "0"], "--calib-timesteps must be a positive count"),
        (["--alpha", "0.3"], "--alpha is a smoothquant setting"),
        (["--classes", "3,10"], "class id 10 is out of range"),
        (["--device", "gpu"], "--device takes auto, cpu or cuda[:N]"),
        (["--vae", "nowhere"], "not a diffusers AutoencoderKL folder"),
    ],
)
def test_bad_pipeline_input_fails_before_calibrating_and_leaves_nothing(tmp_path, tiny_ckpt, args, message):
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["pipeline", "--model", str(tiny_ckpt), "--out", str(out), *args])
    _one_line_error(r, message)
    assert not out.exists()


def test_vae_with_a_pixel_model_is_refused_before_calibrating(tmp_path):
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text("{}")
    r = CliRunner().invoke(main, ["pipeline", "--vae", str(tmp_path / "vae"), "--out", str(tmp_path / "run")])
    _one_line_error(r, "--vae decodes 4-channel latents")
    assert not (tmp_path / "run").exists()


def test_pipeline_out_that_is_a_file_is_refused(tmp_path, tiny_ckpt):
    (tmp_path / "f").write_text("x")
    r = CliRunner().invoke(main, ["pipeline", "--model", str(tiny_ckpt), "--out", str(tmp_path / "f")])
    _one_line_error(r, "is a file, but a folder is written there")
    assert (tmp_path / "f").read_text() == "x"


@pytest.mark.parametrize("where, message", [("under_file", "which is a file, not a folder"), ("folder", "is a folder, but a file is written")])
def test_export_out_path_is_checked_before_the_export(tmp_path, tiny_ckpt, where, message):
    (tmp_path / "f").write_text("x")
    out = tmp_path / "f" / "m.onnx" if where == "under_file" else tmp_path
    before = sorted(p.name for p in tmp_path.iterdir())
    r = CliRunner().invoke(main, ["export", "--model", str(tiny_ckpt), "--out", str(out)])
    _one_line_error(r, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_export_on_cuda_is_refused_not_ignored(tmp_path):
    r = CliRunner().invoke(main, ["export", "--device", "cuda", "--out", str(tmp_path / "m.onnx")])
    _one_line_error(r, "traces on the CPU only")
    assert list(tmp_path.iterdir()) == []


def _samples(path, data):
    from ditrt.diffusion.sample_set import SampleSet

    n = len(data)
    return SampleSet(data, np.arange(n) % 10, np.arange(n), "images", {}).save(path)


def test_evaluate_on_nan_samples_names_the_problem(tmp_path):
    data = np.zeros((4, 1, 8, 8), np.float32)
    data[1, 0, 2, 3] = np.nan
    path = _samples(tmp_path / "s.npz", data)
    r = CliRunner().invoke(main, ["evaluate", str(path), "--save", str(tmp_path / "q.json")])
    _one_line_error(r, "hold 1 NaN/inf values (in 1 of 4 samples)")
    assert not (tmp_path / "q.json").exists()
    ok = _samples(tmp_path / "ok.npz", np.zeros((4, 1, 8, 8), np.float32))
    r = CliRunner().invoke(main, ["evaluate", str(ok), "--reference", str(path)])
    _one_line_error(r, "NaN/inf")


def test_check_json_is_one_object(tmp_path):
    from tests.engines.conftest import write_tiny_onnx

    graph = write_tiny_onnx(tmp_path / "m.onnx")
    r = CliRunner().invoke(main, ["check", str(graph), "--json"])
    assert r.exit_code == 0 and json.loads(r.output) == {"path": str(graph), "violations": [], "passed": True}


def test_check_json_lists_violations_and_exits_1(tmp_path):
    import onnx
    from onnx import numpy_helper

    from tests.engines.conftest import write_tiny_onnx

    graph = write_tiny_onnx(tmp_path / "m.onnx")
    model = onnx.load(str(graph))
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.full((1,), np.nan, np.float32), "w"))
    onnx.save(model, str(graph))
    r = CliRunner().invoke(main, ["check", str(graph), "--json"])
    assert r.exit_code == 1
    res = json.loads(r.output)
    assert res["passed"] is False and res["violations"] and set(res["violations"][0]) == {"node", "rule", "message"}


@pytest.mark.parametrize("args, message", [(["--steps", "0"], "--steps must be positive"), (["--lr", "0"], "--lr must be a positive")])
def test_bad_training_options_fail_before_training(tmp_path, args, message):
    r = CliRunner().invoke(main, ["train", "dit", *args, "--out", str(tmp_path / "m.safetensors")])
    _one_line_error(r, message)
    assert list(tmp_path.iterdir()) == []


def test_workspace_is_converted_in_one_place():
    from ditrt.cli.options import mib_to_bytes

    assert mib_to_bytes(3) == 3 * 2**20 and mib_to_bytes(None) is None


def test_a_keyboard_interrupt_is_one_line_and_exit_130(tmp_path, monkeypatch, tiny_ckpt):
    import ditrt.export.onnx_export

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ditrt.export.onnx_export, "export_model", interrupted)
    r = CliRunner().invoke(main, ["export", "--model", str(tiny_ckpt), "--out", str(tmp_path / "m.onnx")])
    assert r.exit_code == 130 and r.output.strip() == "ditrt: interrupted"


def test_sigint_during_export_in_a_real_process(tmp_path):
    """Ctrl-C while the exporter runs: exit 130, one line on stderr, no output or temp file."""
    out = tmp_path / "o" / "m.onnx"
    # the built-in model: its export (about 7 s after start-up) is still running when the signal comes
    p = subprocess.Popen([sys.executable, "-m", "ditrt", "export", "--model", "builtin", "--out", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    time.sleep(2.5)
    p.send_signal(signal.SIGINT)
    time.sleep(0.05)
    p.send_signal(signal.SIGINT)  # a repeat while cleaning up changes nothing
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 130, stderr
    assert stderr.strip().splitlines() == ["ditrt: interrupted"]
    assert not out.parent.exists() or list(out.parent.iterdir()) == []
