"""ditrt evaluate on RGB images: FID, IS and precision/recall through a local TorchScript network (a
tiny random stand-in with the call of inception-2015-12-05.pt), against an ADM reference batch;
the numbers equal direct computations, 2 torchrun processes give those of one, bad input is one line."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from scipy import linalg

from ditrt.cli import main
from ditrt.diffusion.sample_set import SampleSet, adm_uint8
from tests.conftest import run_torchrun
from tests.quality.standin_inception import adm_precision_recall, save_standin, standin_outputs

WIDTH = 8  # the stand-in's varying features


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    return save_standin(tmp_path_factory.mktemp("net") / "inception-standin.pt", width=WIDTH)


def _images(seed, n, size, shift=0.0):
    """(n, 3, size, size) floats: a random colour per image, a shift between sets, and pixel noise."""
    rng = np.random.default_rng(seed)
    colour = rng.uniform(-0.7, 0.7, (n, 3, 1, 1)) + shift
    return (colour + rng.normal(0, 0.25, (n, 3, size, size))).astype(np.float32)


def _samples(path, x):
    n = len(x)
    return SampleSet(x, np.arange(n) % 10, np.arange(n), "images", {}).save(path)


def _adm(path, x, **stats):
    np.savez(path, arr_0=adm_uint8(x), **stats)
    return path


def _run(*args, env=None):
    return CliRunner(env=env).invoke(main, ["evaluate", *[str(a) for a in args]])


def _json(r):
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def _fid(a, b):
    """FID of two feature sets, directly with numpy/scipy on the varying block (the rest is 0 in both)."""
    mu = a.astype(np.float64).mean(0) - b.astype(np.float64).mean(0)
    s1, s2 = (np.cov(f[:, :WIDTH].astype(np.float64), rowvar=False) for f in (a, b))
    return mu @ mu + np.trace(s1 + s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2)).real


def _inception_score(p):
    p = p.astype(np.float64)
    return np.exp(np.mean(np.sum(p * (np.log(p) - np.log(p.mean(0))), 1)))


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")
    x, r = _images(0, 30, 16), _images(1, 26, 20, shift=0.25)
    return {"x": x, "r": r, "samples": _samples(root / "samples.npz", x), "ref": _adm(root / "ref.npz", r)}


def test_metrics_against_an_adm_batch_equal_direct_computations(tmp_path, net, sets):
    stats = tmp_path / "ref-stats.npz"
    r = _run(sets["samples"], "--reference-batch", sets["ref"], "--inception", net, "--reference-stats", stats,
             "--batch-size", "4", "--json", "--save", tmp_path / "q.json")  # fmt: skip
    res = _json(r)
    assert json.loads((tmp_path / "q.json").read_text()) == res
    fs, ps = standin_outputs(net, adm_uint8(sets["x"]).transpose(0, 3, 1, 2))
    fr, _ = standin_outputs(net, adm_uint8(sets["r"]).transpose(0, 3, 1, 2))
    with np.load(stats) as z:  # the reference statistics: numpy's mean and covariance of the network's features
        assert np.allclose(z["features"], fr, atol=1e-6)
        assert np.allclose(z["mu"], fr.astype(np.float64).mean(0), atol=1e-6)
        assert np.allclose(z["sigma"], np.cov(fr.astype(np.float64), rowvar=False), atol=1e-7)
    assert res["fid"] == pytest.approx(_fid(fs, fr), rel=1e-4) and res["fid"] > 0.01
    assert res["inception_score"] == pytest.approx(_inception_score(ps), rel=1e-5) and res["inception_score_splits"] == 1
    assert (res["precision"], res["recall"]) == pytest.approx(adm_precision_recall(fr, fs))
    assert (res["num_samples"], res["num_reference"], res["resolution"], res["reference_resolution"]) == (30, 26, [16, 16], [20, 20])
    assert res["sfid"] is None and "mixed_6/conv" in res["absent"]["sfid"] and "torchvision" in res["absent"]["lpips"]
    assert "reference_statistics" in res and "computed" in res["reference_statistics"]

    again = _json(_run(sets["samples"], "--reference-stats", stats, "--inception", net, "--batch-size", "4", "--json"))
    assert again["reference_statistics"].startswith("read from") and again["fid"] == res["fid"]
    assert (again["precision"], again["recall"]) == (res["precision"], res["recall"])

    mu, sigma = fr.astype(np.float64).mean(0) + 0.1, 2 * np.cov(fr.astype(np.float64), rowvar=False)
    adm = _adm(tmp_path / "adm-stats.npz", sets["r"], mu=mu, sigma=sigma)
    tf = _json(_run(sets["samples"], "--reference-batch", adm, "--adm-stats", "--inception", net, "--batch-size", "4", "--json"))
    s2 = sigma[:WIDTH, :WIDTH]
    s1 = np.cov(fs[:, :WIDTH].astype(np.float64), rowvar=False)
    d = fs.astype(np.float64).mean(0) - mu
    assert tf["fid"] == pytest.approx(d @ d + np.trace(s1 + s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2)).real, rel=1e-4)
    assert "TensorFlow" in tf["reference_statistics"] and tf["precision"] == res["precision"]


def test_identical_sets_give_fid_0_full_precision_recall_and_a_uniform_network_is_1(tmp_path, sets):
    uniform = save_standin(tmp_path / "uniform.pt", width=WIDTH, uniform=True)
    res = _json(_run(sets["ref"], "--reference-batch", sets["ref"], "--json", env={"DITRT_INCEPTION": str(uniform)}))
    assert res["fid"] == pytest.approx(0, abs=1e-6) and (res["precision"], res["recall"]) == (1.0, 1.0)
    assert res["inception_score"] == pytest.approx(1.0, abs=1e-6) and res["inception"] == str(uniform)
    text = _run(sets["ref"], "--reference-batch", sets["ref"], env={"DITRT_INCEPTION": str(uniform)}).output
    assert "FID" in text and "Inception Score" in text and "sFID" in text and "absent" in text


def _one_line_error(r, message):
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ditrt: error:") and message in lines[0], r.output


def test_bad_inputs_are_one_line_and_write_nothing(tmp_path, net, sets):
    SampleSet(np.zeros((4, 4, 8, 8), np.float32), np.zeros(4, np.int64), np.arange(4), "latents", {}).save(tmp_path / "lat.npz")
    _samples(tmp_path / "grey.npz", np.zeros((4, 1, 16, 16), np.float32))
    np.savez(tmp_path / "plain.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    nan = sets["x"].copy()
    nan[3, 1, 2, 2] = np.nan
    _samples(tmp_path / "nan.npz", nan)
    ref, s = ["--reference-batch", sets["ref"]], sets["samples"]
    cases = [
        ([s, *ref, "--inception", tmp_path / "missing.pt"], "Inception file"),
        ([tmp_path / "lat.npz", *ref, "--inception", net], "holds VAE latents, not images; decode them"),
        ([tmp_path / "grey.npz", *ref, "--inception", net], "holds 1-channel images"),
        ([s], "need the Inception network; pass --inception FILE or set DITRT_INCEPTION"),
        ([s, *ref, "--adm-stats", "--inception", net], "has no precomputed mu/sigma"),
        ([s, "--reference-batch", tmp_path / "none.npz", "--inception", net], "does not exist"),
        ([s, "--reference-stats", tmp_path / "none.npz", "--inception", net], "no --reference-batch to compute it from"),
        ([tmp_path / "nan.npz", *ref, "--inception", net], "holds 1 NaN/inf values (in 1 of 30 samples)"),
        ([s, "--reference", tmp_path / "plain.npz", "--inception", net], "paired PSNR needs two ditrt samples.npz"),
    ]
    for args, message in cases:
        _one_line_error(_run(*args, "--save", tmp_path / "q.json", env={"DITRT_INCEPTION": ""}), message)
    assert not (tmp_path / "q.json").exists() and not (tmp_path / "none.npz").exists()


def test_two_torchrun_processes_give_the_numbers_of_one(tmp_path, net, sets):
    args = [sets["samples"], "--reference-batch", sets["ref"], "--inception", net, "--batch-size", "1", "--device", "cpu"]
    one = _json(_run(*args, "--json", "--reference-stats", tmp_path / "one.npz"))
    p = run_torchrun(2, "evaluate", *args, "--json", "--reference-stats", tmp_path / "two.npz", "--save", tmp_path / "two.json", timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    two = json.loads(p.stdout)  # only the main rank prints
    assert json.loads((tmp_path / "two.json").read_text()) == two
    assert (one.pop("world_size"), two.pop("world_size")) == (1, 2)
    assert one == two  # chunks of 8: 30 samples (rank 0 takes chunks 0, 2; rank 1: 1, 3), 26 reference images
    with np.load(tmp_path / "one.npz") as a, np.load(tmp_path / "two.npz") as b:
        assert all(np.array_equal(a[k], b[k]) for k in ("mu", "sigma", "features"))
