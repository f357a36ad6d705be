"""`ditrt export --json`: one JSON object on stdout, the same bytes as the library's export, the registry's dtype note."""

import json

import pytest
from click.testing import CliRunner

from ditrt.cli import main
from ditrt.models.checkpoints import save_ditrt_checkpoint
from tests.conftest import TINY, random_dit


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    p = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_ditrt_checkpoint(random_dit(TINY), p)
    return p


def test_export_json_is_one_object_and_the_graph_is_the_librarys(tmp_path, tiny_ckpt):
    from ditrt.export import export_onnx
    from ditrt.models.builtin import load_model

    out = tmp_path / "m.onnx"
    r = CliRunner().invoke(main, ["export", "--model", str(tiny_ckpt), "--json", "--out", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["what"] == "float" and res["dtype"] == "fp32" and res["manifest"] is None
    assert res["graphs"] == [{"path": str(out), "size_bytes": out.stat().st_size, "violations": [], "passed": True}]
    ref = export_onnx(load_model(str(tiny_ckpt)), tmp_path / "ref.onnx")
    assert out.read_bytes() == ref.read_bytes()


def test_w4a16_float32_export_notes_the_registry_dtype(tmp_path, tiny_ckpt):
    r = CliRunner().invoke(main, ["calibrate", "--model", str(tiny_ckpt), "--method", "minmax", "--precision", "w4a16",
                                  "--calib-timesteps", "2", "--calib-samples", "2", "--calib-steps", "10", "--out", str(tmp_path / "r")])  # fmt: skip
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["export", "--model", str(tiny_ckpt), "--recipe", str(tmp_path / "r"), "--json", "--out", str(tmp_path / "q.onnx")])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["what"] == "minmax w4a16" and "--dtype fp16" in res["note"] and res["graphs"][0]["passed"]
