"""`ditrt export --json`: one JSON object on stdout, the same bytes as the library's export, the registry's dtype note."""

import json

from click.testing import CliRunner

from ditrt.cli import main


def test_export_json_is_one_object_and_the_graph_is_the_librarys(tmp_path, tiny_ckpt, exported):
    out = tmp_path / "m.onnx"
    r = CliRunner().invoke(main, ["export", "--model", str(tiny_ckpt), "--json", "--out", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["what"] == "float" and res["dtype"] == "fp32" and res["manifest"] is None
    assert res["graphs"] == [{"path": str(out), "size_bytes": out.stat().st_size, "violations": [], "passed": True}]
    assert out.read_bytes() == exported("tiny").read_bytes()  # export_onnx of the model the checkpoint holds (tests/conftest.py)


def test_w4a16_float32_export_notes_the_registry_dtype(tmp_path, tiny_ckpt):
    r = CliRunner().invoke(main, ["calibrate", "--model", str(tiny_ckpt), "--method", "minmax", "--precision", "w4a16",
                                  "--calib-timesteps", "2", "--calib-samples", "2", "--calib-steps", "10", "--out", str(tmp_path / "r")])  # fmt: skip
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["export", "--model", str(tiny_ckpt), "--recipe", str(tmp_path / "r"), "--json", "--out", str(tmp_path / "q.onnx")])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["what"] == "minmax w4a16" and "--dtype fp16" in res["note"] and res["graphs"][0]["passed"]
