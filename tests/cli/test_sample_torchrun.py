"""`ditrt sample` in shards from the command line: two real torchrun processes (gloo) finish a run that
one process started and give bit-for-bit the one-process result, ADM evaluator npz included; a
re-run of a finished run does nothing; shards of another run (by every rank, none left waiting) and
options that cannot work are refused in one line before sampling."""

import json
import os
import subprocess

import numpy as np
import pytest
from click.testing import CliRunner

from ditrt.cli import main
from tests.conftest import run_torchrun


def run(*args):
    return CliRunner().invoke(main, ["sample", *map(str, args)], catch_exceptions=False)


def _torchrun(nproc: int, *args) -> subprocess.CompletedProcess:
    return run_torchrun(nproc, "sample", *args, timeout=180)


def _arrays(path):
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.keys()}


def test_two_torchrun_processes_resume_a_one_process_run_bit_for_bit(tmp_path, tiny_ckpt, vae_dir):
    common = [tiny_ckpt, "--vae", vae_dir, "--adm-npz", "--steps", "3", "--batch-size", "2", "--seed", "5", "--classes", "1,2,7"]
    r = run(*common, "--num", "6", "--out", tmp_path / "one")
    assert r.exit_code == 0, r.output
    assert "(6 images, 3 shards (0 resumed) on 1 process)" in r.output and not (tmp_path / "one" / "shards").exists()

    two = tmp_path / "two"
    assert run(*common, "--num", "2", "--keep-shards", "--out", two).exit_code == 0  # a run stopped after its first shard
    first = two / "shards" / "00000-00001.npz"
    os.utime(first, ns=(1, 1))  # were it rewritten, its mtime would change
    p = _torchrun(2, *common, "--num-samples", "6", "--keep-shards", "--json", "--out", two)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(p.stdout)  # rank 0 alone prints it
    assert (report["processes"], report["shards"], report["resumed"], report["already_complete"]) == (2, 3, 1, False)
    assert first.stat().st_mtime_ns == 1 and len(list((two / "shards").glob("*.npz"))) == 3
    assert "resumed 1 of 3 shards" in p.stderr

    a, b = _arrays(tmp_path / "one" / "samples.npz"), _arrays(two / "samples.npz")
    assert a.keys() == b.keys() == {"images", "labels", "seeds", "settings"}
    assert all(np.array_equal(a[k], b[k]) for k in a)  # the data, labels, seeds and settings (no world size in them)
    assert a["images"].shape == (6, 3, 16, 16) and a["labels"].tolist() == [1, 2, 7, 1, 2, 7]
    assert a["seeds"].tolist() == list(range(5, 11))
    adm_a, adm_b = _arrays(tmp_path / "one" / "adm_samples.npz"), _arrays(two / "adm_samples.npz")
    assert adm_a.keys() == adm_b.keys() == {"arr_0", "arr_1"} and all(np.array_equal(adm_a[k], adm_b[k]) for k in adm_a)
    assert adm_a["arr_0"].dtype == np.uint8 and adm_a["arr_0"].shape == (6, 16, 16, 3)
    assert adm_a["arr_1"].tolist() == a["labels"].tolist()
    expected = np.clip(np.float32(127.5) * a["images"] + np.float32(128), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    assert np.array_equal(adm_a["arr_0"], expected)

    again = run(*common, "--num", "6", "--json", "--out", tmp_path / "one")  # the same command once more: nothing to do
    assert again.exit_code == 0 and json.loads(again.stdout)["already_complete"] is True


def test_a_shard_of_another_run_is_refused_in_one_line_and_overwrite_starts_over(tmp_path, tiny_ckpt):
    out = tmp_path / "o"
    assert run(tiny_ckpt, "--steps", "3", "--num", "2", "--seed", "1", "--keep-shards", "--out", out).exit_code == 0
    shard = out / "shards" / "00000-00001.npz"
    before = shard.read_bytes()
    r = CliRunner().invoke(main, ["sample", str(tiny_ckpt), "--steps", "3", "--num", "4", "--batch-size", "2", "--out", str(out)])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert "is a shard of another run (seed 1 there, 0 here); pass --overwrite" in r.output
    assert shard.read_bytes() == before and not (out / "shards" / "00002-00003.npz").exists()
    p = _torchrun(2, tiny_ckpt, "--steps", "3", "--num-samples", "4", "--batch-size", "2", "--out", out)  # every rank refuses
    errors = [line for line in p.stderr.splitlines() if line.startswith("ditrt: error:")]
    assert p.returncode != 0 and len(errors) == 2, p.stderr[-3000:]  # one line from each rank, and none left waiting
    assert all("is a shard of another run (seed 1 there, 0 here)" in e for e in errors)
    assert shard.read_bytes() == before and not (out / "shards" / "00002-00003.npz").exists()
    r = run(tiny_ckpt, "--steps", "3", "--num", "4", "--batch-size", "2", "--overwrite", "--out", out)
    assert r.exit_code == 0 and np.load(out / "samples.npz")["seeds"].tolist() == [0, 1, 2, 3] and not (out / "shards").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["{ckpt}", "--adm-npz"], "--adm-npz needs images, but"),
        (["builtin", "--adm-npz"], "makes 1-channel images; drop --adm-npz"),
    ],
)
def test_an_adm_npz_that_cannot_be_written_is_refused_before_sampling(tmp_path, tiny_ckpt, args, message):
    args = [a.format(ckpt=tiny_ckpt) for a in args]
    r = CliRunner().invoke(main, ["sample", *args, "--steps", "3", "--num", "2", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and message in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "o").exists()


def _opened_as(monkeypatch, calls: list, **fields):
    """`ditrt sample` opens its artifact as usual, then the OpenDenoiser gets ``fields`` (what an engine's
    profile or a backend computing elsewhere would say) and records the rows and device of each call."""
    import ditrt.runtime.open as open_module

    real = open_module.open_denoiser

    def opened_as(*a, **kw):
        opened = real(*a, **kw)
        inner = opened.denoiser
        opened.denoiser = lambda x, t, y: calls.append((x.shape[0], x.device.type)) or inner(x, t, y)
        for name, value in fields.items():
            setattr(opened, name, value)
        return opened

    monkeypatch.setattr(open_module, "open_denoiser", opened_as)


def test_a_chunk_below_the_backends_minimum_rows_is_refused_before_sampling(tmp_path, tiny_ckpt, monkeypatch):
    """A backend taking 6..8 rows per call (an engine built with `ditrt build --batch 3:4:4`): 4 images
    per guided call, at least 3; the last chunk of --num 5 would hold 1."""
    calls = []
    _opened_as(monkeypatch, calls, min_rows=6, max_rows=8)
    cases = [(["--num", "5"], "chunk of 1 (2 rows with guidance); pass a --num that fills its last chunk (e.g. --num 8)"),
             (["--num", "4", "--batch-size", "2"], "chunk of 2 (4 rows with guidance); pass --batch-size 3 or more")]  # fmt: skip
    for extra, message in cases:
        r = CliRunner().invoke(main, ["sample", str(tiny_ckpt), "--steps", "2", *extra, "--out", str(tmp_path / "o")])
        assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
        assert "takes at least 6 rows per call" in r.output and message in r.output and "`ditrt build --batch" in r.output
        assert not (tmp_path / "o").exists() and calls == []
    r = run(tiny_ckpt, "--steps", "2", "--num", "8", "--out", tmp_path / "o")  # the fix it named
    assert r.exit_code == 0, r.output
    assert {rows for rows, _ in calls} == {8}


def test_sampling_happens_on_the_device_the_backend_computes_on(tmp_path, tiny_ckpt, monkeypatch):
    """--device cpu, but the backend says it computes on 'meta' (as ONNX Runtime without its CUDA
    provider says 'cpu' under --device cuda): the sampler's tensors are made there, not on --device.
    (The torch model behind it is on the CPU, so the first call stops at copying a meta tensor.)"""
    calls = []
    _opened_as(monkeypatch, calls, device="meta")
    r = CliRunner().invoke(main, ["sample", str(tiny_ckpt), "--steps", "2", "--num", "2", "--device", "cpu", "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and calls == [(4, "meta")]  # 2 images, guided
