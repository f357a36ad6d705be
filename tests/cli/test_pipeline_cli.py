"""`ditrt pipeline` on a tiny random 4-channel (DiT-XL/2-layout) model: what it writes, what it checks
and measures, and that a failed or interrupted run leaves nothing."""

import json
import os
import signal
import subprocess
import sys
import time

import onnx
import pytest
from click.testing import CliRunner

from ditrt.cli import main
from ditrt.engines.build import tensorrt_available

FAST = ["--steps", "5", "--num", "2", "--calib-timesteps", "2", "--calib-samples", "2", "--calib-steps", "10", "--device", "cpu"]


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory, tiny_ckpt):
    out = tmp_path_factory.mktemp("p") / "run"
    r = CliRunner().invoke(main, ["pipeline", "--model", str(tiny_ckpt), *FAST, "--json", "--out", str(out)])
    return out, r


def test_latent_pipeline_json_is_one_object_and_says_only_what_it_wrote(latent_run):
    out, r = latent_run
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report == json.loads((out / "report.json").read_text())
    assert {f.split("/")[0] for f in report["files"]} == {p.name for p in out.iterdir()}
    assert all((out / f).exists() for f in report["files"])
    assert "comparison.png" not in report["files"] and not (out / "comparison.png").exists()
    assert "comparison.png" not in (out / "report.md").read_text()


def test_latent_pipeline_reports_what_was_measured_on_what(latent_run):
    out, _ = latent_run
    report = json.loads((out / "report.json").read_text())
    q = report["quality"]
    assert q["measured_on"] == "latents" and 0 < q["latent_rel_l2"] < 0.1
    assert "psnr_db" not in q and "--vae" in q["absent"]["psnr_db"]
    assert "fd_float" not in q and "(1, 8, 8) digits" in q["absent"]["fd"]
    assert "not measured" in (out / "report.md").read_text()
    devices = report["devices"]  # where each model ran (--device cpu here: everything)
    assert set(devices) == {"float", "simulation", "calibration", "comparison_inputs", "quantized"} and set(devices.values()) == {"cpu"}


def test_the_checked_graph_is_the_graph_that_runs(latent_run):
    out, _ = latent_run
    report = json.loads((out / "report.json").read_text())
    qz, check = report["quantized"], report["check"]
    assert check["graphs"] == [qz["graph"]] and check["passed"]
    graph = onnx.load(str(out / qz["graph"]), load_external_data=False)
    meta = {p.key: p.value for p in graph.metadata_props}
    assert meta["ditrt.dtype"] == check["dtype"] == qz["dtype"]
    if tensorrt_available()[0]:
        assert qz["backend"] == "tensorrt" and check["dtype"] == "fp16"
    else:
        assert qz["backend"] == "onnxruntime" and qz["artifact"] == qz["graph"] and check["dtype"] == "fp32"


def test_parity_tolerance_comes_from_the_precision_registry(latent_run):
    from ditrt.contracts.precisions import get_precision

    out, _ = latent_run
    report = json.loads((out / "report.json").read_text())
    tol = get_precision(report["recipe"]["precision"]).parity
    c = report["compare"]
    assert (c["atol"], c["rtol"], c["error_stat"]) == (tol.atol, tol.rtol, tol.error_stat) and c["passed"]


def test_w4a16_pipeline_runs_the_registry_dtype(tmp_path, tiny_ckpt):
    from ditrt.contracts.precisions import get_precision

    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["pipeline", "--model", str(tiny_ckpt), "--method", "minmax", "--precision", "w4a16", *FAST, "--out", str(out)])
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    tol = get_precision("w4a16").parity
    assert report["compare"]["error_stat"] == tol.error_stat and report["compare"]["atol"] == tol.atol
    assert report["recipe"]["precision"] == "w4a16" and report["check"]["passed"]


def test_a_failure_after_work_started_removes_the_folder_it_created(tmp_path, tiny_ckpt, monkeypatch):
    import ditrt.pipeline
    from ditrt.contracts.errors import ArtifactError

    def broken(*a, **k):
        raise ArtifactError("the comparison broke")

    monkeypatch.setattr(ditrt.pipeline, "_compare", broken)
    out = tmp_path / "deep" / "run"
    r = CliRunner().invoke(main, ["pipeline", "--model", str(tiny_ckpt), *FAST, "--out", str(out)])
    assert r.exit_code == 2 and "the comparison broke" in r.output
    assert list(tmp_path.iterdir()) == []  # also the parent it created


def test_a_failure_in_an_existing_folder_removes_only_what_it_wrote(tmp_path, tiny_ckpt, monkeypatch):
    import ditrt.pipeline

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ditrt.pipeline, "_compare", interrupted)
    (tmp_path / "notes.txt").write_text("mine")
    r = CliRunner().invoke(main, ["pipeline", "--model", str(tiny_ckpt), *FAST, "--out", str(tmp_path)])
    assert r.exit_code == 130 and r.output.strip().splitlines()[-1] == "ditrt: interrupted"
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_sigint_during_a_real_pipeline_leaves_no_output_folder(tmp_path, tiny_ckpt):
    out = tmp_path / "run"
    # a sampling run long enough (250 steps x 64 images, minutes) that the signal always lands inside the pipeline
    slow = [*FAST, "--steps", "250", "--num", "64"]
    p = subprocess.Popen([sys.executable, "-m", "ditrt", "pipeline", "--model", str(tiny_ckpt), *slow, "--out", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    # the signal goes once the pipeline has started its first stage (not during interpreter start-up, which
    # a loaded machine can stretch past any fixed sleep), and a little into it
    first = p.stdout.readline()
    assert first.startswith("[1/"), first
    time.sleep(1)
    p.send_signal(signal.SIGINT)
    _, stderr = p.communicate(timeout=60)
    assert p.returncode == 130, stderr
    assert stderr.rstrip().splitlines()[-1] == "ditrt: interrupted" and "Traceback" not in stderr
    assert not out.exists()
