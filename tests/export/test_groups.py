"""The timestep-group manifest shared by exported graphs and built engines."""

import json

import pytest

from ditrt.contracts.errors import ArtifactError, ConfigError
from ditrt.contracts.groups import group_file, group_stem, manifest_path, read_manifest, write_manifest


def test_names_derive_from_one_stem(tmp_path):
    for out in ("m.onnx", "m.plan", "m.groups.json"):
        assert group_stem(tmp_path / out) == tmp_path / "m"
        assert manifest_path(tmp_path / out) == tmp_path / "m.groups.json"
    assert group_file(tmp_path / "m.trt.plan", 1, ".plan") == tmp_path / "m.trt.g1.plan"


def test_round_trip_and_kind_is_checked(tmp_path):
    files = [tmp_path / f"m.g{g}.plan" for g in range(3)]
    for f in files:
        f.write_bytes(b"x")
    out = write_manifest(tmp_path / "m.plan", (600.0, 300.0), files, "tensorrt")
    assert out == tmp_path / "m.groups.json"
    assert read_manifest(out, "tensorrt") == ((600.0, 300.0), files)
    assert read_manifest(out) == ((600.0, 300.0), files)
    with pytest.raises(ConfigError, match="lists TensorRT engines, not ONNX graphs"):
        read_manifest(out, "onnx")


def test_a_manifest_without_kind_is_one_of_graphs(tmp_path):
    (tmp_path / "m.g0.onnx").write_bytes(b"x")
    (tmp_path / "m.g1.onnx").write_bytes(b"x")
    d = {"format": "ditrt-timestep-groups", "edges": [500], "graphs": ["m.g0.onnx", "m.g1.onnx"]}
    (tmp_path / "m.groups.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="ditrt build --onnx M.groups.json"):
        read_manifest(tmp_path / "m.groups.json", "tensorrt")
    assert read_manifest(tmp_path / "m.groups.json", "onnx")[0] == (500.0,)


@pytest.mark.parametrize("text", ["not json", "[]", '{"format": "other"}', '{"format": "ditrt-timestep-groups", "edges": [1], "graphs": []}'])
def test_broken_manifests_are_refused(tmp_path, text):
    (tmp_path / "m.groups.json").write_text(text)
    with pytest.raises(ArtifactError, match="m.groups.json"):
        read_manifest(tmp_path / "m.groups.json")


def test_a_missing_file_is_named(tmp_path):
    (tmp_path / "m.g0.onnx").write_bytes(b"x")
    write_manifest(tmp_path / "m.onnx", (500.0,), [tmp_path / "m.g0.onnx", tmp_path / "m.g1.onnx"], "onnx")
    with pytest.raises(ArtifactError, match=r"m\.g1\.onnx listed in .* is missing; re-run `ditrt export`"):
        read_manifest(tmp_path / "m.groups.json")


def test_write_refuses_files_elsewhere_or_a_wrong_count(tmp_path):
    with pytest.raises(ValueError):
        write_manifest(tmp_path / "m.onnx", (500.0,), [tmp_path / "a.onnx"], "onnx")
    with pytest.raises(ValueError):
        write_manifest(tmp_path / "m.onnx", (), [tmp_path / "sub" / "a.onnx"], "onnx")
    assert list(tmp_path.iterdir()) == []
