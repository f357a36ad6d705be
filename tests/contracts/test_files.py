"""Atomic writes and output folders: an interrupted command leaves no partial artifact."""

import pytest

from ditrt.contracts.errors import ConfigError
from ditrt.contracts.files import atomic_write, check_writable, output_folder


def test_atomic_write_leaves_nothing_when_interrupted(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")

    def write(tmp):
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, write)
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


def test_output_folder_removes_what_it_created_on_any_failure(tmp_path):
    out = tmp_path / "new" / "run"
    with pytest.raises(KeyboardInterrupt), output_folder(out):
        atomic_write(out / "weights.safetensors", lambda tmp: tmp.write_bytes(b"w"))
        raise KeyboardInterrupt  # before recipe.json
    assert not (tmp_path / "new").exists()


def test_output_folder_in_an_existing_folder_removes_only_new_files(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(RuntimeError), output_folder(tmp_path):
        (tmp_path / "sub").mkdir()
        (tmp_path / "sub" / "x").write_text("new")
        (tmp_path / "y").write_text("new")
        raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_output_folder_keeps_everything_on_success(tmp_path):
    with output_folder(tmp_path / "ok") as out:
        (out / "a").write_text("1")
    assert (tmp_path / "ok" / "a").read_text() == "1"


@pytest.mark.parametrize("case", ["under-a-file", "file-as-folder", "folder-as-file"])
def test_check_writable_refuses_impossible_outputs(tmp_path, case):
    f = tmp_path / "f"
    f.write_text("x")
    path, folder = {"under-a-file": (f / "out", True), "file-as-folder": (f, True), "folder-as-file": (tmp_path, False)}[case]
    with pytest.raises(ConfigError):
        check_writable(path, folder=folder)
