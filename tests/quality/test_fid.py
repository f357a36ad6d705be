"""The Inception metrics on real components: the ADM rules of FID, IS and precision/recall checked
against direct numpy/scipy computations, the network file loaded and probed, the image formats read
exactly (a tiny random TorchScript stand-in plays the Inception network)."""

import numpy as np
import pytest
import torch
from scipy import linalg

from ditrt.contracts.errors import ArtifactError, ConfigError, InputError
from ditrt.diffusion.sample_set import ArrayStream, SampleSet, write_adm_npz
from ditrt.quality import fid
from ditrt.quality.image_sets import open_reference_batch, open_samples
from ditrt.quality.inception import inception_outputs, load_inception
from ditrt.quality.inception_score import inception_score
from ditrt.quality.precision_recall import precision_recall
from tests.quality.standin_inception import adm_precision_recall, save_standin, standin_outputs


@pytest.fixture(scope="module")
def net_file(tmp_path_factory):
    return save_standin(tmp_path_factory.mktemp("net") / "inception-standin.pt")


def _features(seed, n=60, d=6, shift=0.0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + shift).astype(np.float32)


def test_statistics_and_fid_match_numpy_and_scipy():
    a, b = _features(0), _features(1, shift=0.7)
    sa, sb = fid.GaussianStats.of(a), fid.GaussianStats.of(b)
    assert np.array_equal(sa.mu, a.astype(np.float64).mean(0)) and np.array_equal(sa.sigma, np.cov(a.astype(np.float64), rowvar=False))
    direct = ((sa.mu - sb.mu) ** 2).sum() + np.trace(sa.sigma + sb.sigma - 2 * linalg.sqrtm(sa.sigma @ sb.sigma).real)
    assert fid.frechet_distance(sa, sb) == pytest.approx(direct, rel=1e-10) and direct > 1
    assert fid.frechet_distance(sa, sa) == pytest.approx(0, abs=1e-6)
    # dead units (zero in both sets) add only their mean difference: the same FID as without them
    pad = lambda f, v: np.concatenate([f, np.full((len(f), 3), v, np.float32)], 1)  # noqa: E731
    padded = fid.frechet_distance(fid.GaussianStats.of(pad(a, 0)), fid.GaussianStats.of(pad(b, 2)))
    assert padded == pytest.approx(direct + 3 * 4, rel=1e-10)


def test_fid_of_fewer_samples_than_dimensions_follows_the_adm_fallback():
    a, b = _features(2, n=5, d=12), _features(3, n=5, d=12, shift=0.2)  # singular covariances
    sa, sb = fid.GaussianStats.of(a), fid.GaussianStats.of(b)
    covmean = linalg.sqrtm(sa.sigma @ sb.sigma)
    if not np.isfinite(covmean).all():
        covmean = linalg.sqrtm((sa.sigma + 1e-6 * np.eye(12)) @ (sb.sigma + 1e-6 * np.eye(12)))
    direct = ((sa.mu - sb.mu) ** 2).sum() + np.trace(sa.sigma) + np.trace(sb.sigma) - 2 * np.trace(covmean).real
    assert fid.frechet_distance(sa, sb) == pytest.approx(direct, rel=1e-9)
    with pytest.raises(InputError, match="at least 2 feature vectors"):
        fid.GaussianStats.of(a[:1])


def test_inception_score_splits_of_5000_and_its_limits():
    assert inception_score(np.full((7, 1008), 1 / 1008)).score == pytest.approx(1.0, abs=1e-12)
    assert inception_score(np.eye(4)).score == pytest.approx(4.0)  # confident and diverse: the number of classes
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.full(5, 0.3), size=12000)
    s = inception_score(p)
    parts = [p[i : i + 5000] for i in (0, 5000, 10000)]
    direct = np.mean([np.exp(np.mean(np.sum(q * (np.log(q) - np.log(q.mean(0))), 1))) for q in parts])
    assert (s.splits, s.split_size) == (3, 5000) and s.score == pytest.approx(direct, rel=1e-12)
    assert inception_score(p[:300]).splits == 1


def test_precision_recall_follows_the_manifold_rule_in_bounded_blocks():
    ref, smp = _features(4, n=41, d=5).astype(np.float64), _features(5, n=37, d=5, shift=0.8).astype(np.float64)
    expected = adm_precision_recall(ref, smp)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    assert precision_recall(ref, smp, block=7) == pytest.approx(expected)  # blocks of 7 x 7 pairs
    assert precision_recall(ref, ref, block=8) == (1.0, 1.0)
    assert precision_recall(ref, ref + 1e3) == (0.0, 0.0)
    with pytest.raises(InputError, match="more than 3 images"):
        precision_recall(ref[:3], smp)


def test_the_network_file_is_loaded_and_probed_with_one_line_errors(tmp_path, net_file):
    net = load_inception(net_file)
    assert len(net.sha256) == 64
    with pytest.raises(ConfigError, match="does not exist.*inception-2015-12-05.pt"):
        load_inception(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a zip archive" * 10)
    torch.save({"w": torch.zeros(2)}, tmp_path / "state.pt")
    for bad in ("junk.pt", "state.pt"):
        with pytest.raises(ArtifactError, match="is not a TorchScript archive"):
            load_inception(tmp_path / bad)
    torch.jit.save(torch.jit.script(torch.nn.Linear(3, 3)), str(tmp_path / "linear.pt"))
    with pytest.raises(ArtifactError, match="does not take"):
        load_inception(tmp_path / "linear.pt")
    save_standin(tmp_path / "narrow.pt", features=108)  # a network of another shape
    with pytest.raises(ArtifactError, match=r"gives features \(2, 108\)"):
        load_inception(tmp_path / "narrow.pt")


def test_adm_reference_batch_is_read_exactly(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (5, 6, 7, 3), dtype=np.uint8)
    mu, sigma = rng.normal(size=2048), rng.normal(size=(2048, 2048))
    np.savez(tmp_path / "ref.npz", arr_0=arr, mu=mu, sigma=sigma, mu_s=mu[:7], sigma_s=sigma[:7, :7])
    ref = open_reference_batch(tmp_path / "ref.npz")
    assert (len(ref), ref.channels, ref.resolution, ref.layout) == (5, 3, (6, 7), "adm")
    assert isinstance(ref.pixels, np.memmap) and np.array_equal(ref.pixels, arr)
    assert np.array_equal(ref.uint8(range(1, 4)), arr[1:4].transpose(0, 3, 1, 2))
    stats = fid.adm_statistics(tmp_path / "ref.npz", 2048)
    assert np.array_equal(stats.mu, mu) and np.array_equal(stats.sigma, sigma)
    np.savez_compressed(tmp_path / "zipped.npz", arr_0=arr)  # compressed members are read whole
    assert np.array_equal(open_reference_batch(tmp_path / "zipped.npz").pixels, arr)
    np.savez(tmp_path / "no_stats.npz", arr_0=arr)
    assert fid.adm_statistics(tmp_path / "no_stats.npz", 2048) is None
    np.savez(tmp_path / "floats.npz", arr_0=arr.astype(np.float32))
    with pytest.raises(ArtifactError, match="must be uint8"):
        open_reference_batch(tmp_path / "floats.npz")


def test_ditrt_samples_and_the_adm_npz_ditrt_writes_of_them_are_the_same_input(tmp_path, net_file):
    rng = np.random.default_rng(1)
    x = rng.uniform(-1.2, 1.2, (9, 3, 10, 10)).astype(np.float32)
    expected = torch.clamp(127.5 * torch.from_numpy(x) + 128.0, 0, 255).to(torch.uint8).numpy()  # DiT's sample_ddp.py
    SampleSet(x, np.zeros(9, np.int64), np.arange(9), "images", {}).save(tmp_path / "s.npz")
    write_adm_npz(tmp_path / "adm.npz", ArrayStream(x.shape, np.float32, lambda: (x[:4], x[4:])), np.zeros(9, np.int64))
    samples, adm = open_samples(tmp_path / "s.npz"), open_samples(tmp_path / "adm.npz")
    assert isinstance(samples.pixels, np.memmap) and isinstance(adm.pixels, np.memmap)  # streamed zip64 members map too
    assert np.array_equal(samples.uint8(range(9)), expected) and np.array_equal(adm.uint8(range(2, 7)), expected[2:7])
    net = load_inception(net_file)
    a, b = inception_outputs(net, samples, batch_size=2), inception_outputs(net, adm, batch_size=2)
    assert np.array_equal(a.pool, b.pool) and np.array_equal(a.probs, b.probs)
    pool, probs = standin_outputs(net_file, expected)  # the network called directly, in one batch
    assert a.pool.shape == (9, 2048) and np.allclose(a.pool, pool, atol=1e-6) and np.allclose(a.probs, probs, atol=1e-6)


def test_reference_stats_file_round_trip_and_refusals(tmp_path):
    f = _features(6, n=10, d=4)
    rs = fid.ReferenceStats(fid.GaussianStats.of(f), f, "a" * 64, "ref.npz", 123, (256, 256))
    rs.save(tmp_path / "st.npz")
    back = fid.ReferenceStats.load(tmp_path / "st.npz", inception_sha256="a" * 64)
    assert np.array_equal(back.stats.sigma, rs.stats.sigma) and np.array_equal(back.features, rs.features)
    assert (back.source, back.source_bytes, back.resolution) == ("ref.npz", 123, (256, 256))
    with pytest.raises(ArtifactError, match="another Inception file"):
        fid.ReferenceStats.load(tmp_path / "st.npz", inception_sha256="b" * 64)
    np.savez(tmp_path / "other.npz", mu=np.zeros(3))
    with pytest.raises(ArtifactError, match="not a ditrt reference statistics file"):
        fid.ReferenceStats.load(tmp_path / "other.npz", inception_sha256="a" * 64)
