import numpy as np
import pytest
import torch

from ditrt.contracts.errors import InputError
from ditrt.data.digits import load_digits_tensors, split_halves
from ditrt.quality import metrics
from ditrt.quality.images import sample_grid, to_uint8


@pytest.fixture(scope="module")
def digits():
    return load_digits_tensors()


def test_classifier_recognises_real_digits(digits):
    images, labels = digits
    assert metrics.class_accuracy(images, labels.numpy()) >= 0.98


def test_fd_is_zero_on_identical_sets_and_large_on_noise(digits):
    images, _ = digits
    f = metrics.features(images[:400])
    assert metrics.frechet_distance(f, f) == pytest.approx(0.0, abs=1e-6)
    floor = metrics.fd_floor()
    a, b = split_halves(len(images))
    assert floor == pytest.approx(metrics.frechet_distance(metrics.features(images[a]), metrics.features(images[b])))
    noise = torch.rand(400, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert metrics.fd_to_real(noise) > 20 * floor


def test_frechet_distance_of_gaussians_matches_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(0, 1, (20000, 3))
    b = rng.normal(0.5, 2, (20000, 3))
    # ||mu||^2 + tr(I + 4I - 2*2I) = 3*0.25 + 3*(1 + 4 - 4)
    assert metrics.frechet_distance(a, b) == pytest.approx(0.75 + 3.0, rel=0.05)


def test_paired_psnr_known_value_and_shape_check():
    a = np.zeros((2, 1, 8, 8))
    b = a + 0.02  # mse 4e-4 on a data range of 2 -> 10 log10(4 / 4e-4) = 40 dB
    assert metrics.paired_psnr(a, b) == pytest.approx(40.0)
    assert metrics.paired_psnr(a, a) == metrics.PSNR_CAP_DB
    with pytest.raises(InputError):
        metrics.paired_psnr(a, a[:1])


def test_evaluator_refuses_images_of_another_shape():
    with pytest.raises(InputError, match="8, 8"):
        metrics.class_accuracy(np.zeros((2, 3, 32, 32)), [0, 1])


def test_error_by_timestep_rows():
    x, t, y = torch.ones(2, 1, 2, 2), torch.tensor([5.0, 5.0]), torch.tensor([0, 1])
    rows = metrics.error_by_timestep(lambda *a: torch.ones(2, 2, 2, 2), lambda *a: torch.full((2, 2, 2, 2), 1.1), [(x, t, y)], channels=1)
    assert rows == [{"t": 5.0, "rel_error": pytest.approx(0.1)}]


def test_grid_has_one_labelled_row_per_class():
    imgs = np.linspace(-1, 1, 6 * 64).reshape(6, 1, 8, 8)
    grid = sample_grid(imgs, [3, 1, 3, 1, 3, 1], title="t")
    assert to_uint8(imgs).shape == (6, 8, 8, 1)
    assert grid.height >= 2 * 8 * 6 and grid.width >= 3 * 8 * 6


def test_non_finite_samples_are_refused_by_name_not_a_linalg_error():
    imgs = np.zeros((3, 1, 8, 8), np.float32)
    imgs[2, 0, 0, 0] = np.inf
    with pytest.raises(InputError, match=r"1 NaN/inf values \(in 1 of 3 samples\)"):
        metrics.fd_to_real(imgs)
    with pytest.raises(InputError, match="NaN/inf"):
        metrics.paired_psnr(imgs, np.zeros_like(imgs))


def _pair(per_sample_rms, seed=0):
    """Reference zeros and a test set whose sample i has RMS error ``per_sample_rms[i]`` (random signs)."""
    rms = np.asarray(per_sample_rms, dtype=np.float64)
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(len(rms), 1, 8, 8))
    return np.zeros((len(rms), 1, 8, 8)), signs * rms[:, None, None, None]


def test_psnr_interval_holds_the_pooled_psnr_and_shrinks_with_more_samples():
    rng = np.random.default_rng(1)
    a, b = _pair(rng.uniform(0.005, 0.02, 40))
    psnr, lo, hi = metrics.paired_psnr_interval(a, b, resamples=500)
    assert psnr == pytest.approx(metrics.paired_psnr(a, b), abs=1e-9)
    assert lo < psnr < hi
    big_a, big_b = _pair(rng.uniform(0.005, 0.02, 4000))
    _, big_lo, big_hi = metrics.paired_psnr_interval(big_a, big_b, resamples=500)
    assert big_hi - big_lo < 0.3 * (hi - lo)  # width ~ 1/sqrt(N): 10x the samples, ~1/3.2 the width
    assert metrics.paired_psnr_interval(a, b, resamples=500) == (psnr, lo, hi)  # seeded


def test_one_outlier_sample_widens_the_interval():
    rms = np.full(64, 0.01)
    rms[::2] = 0.012  # some spread, so the clean interval is not a point
    _, lo, hi = metrics.paired_psnr_interval(*_pair(rms), resamples=500)
    rms[7] = 0.2  # one sample carries most of the squared error
    psnr, out_lo, out_hi = metrics.paired_psnr_interval(*_pair(rms), resamples=500)
    assert out_lo <= psnr <= out_hi
    assert out_hi - out_lo > 5 * (hi - lo)


def test_psnr_interval_refuses_bad_settings():
    a, b = _pair([0.01, 0.02])
    with pytest.raises(InputError, match="confidence"):
        metrics.paired_psnr_interval(a, b, confidence=95)
    with pytest.raises(InputError, match="resample"):
        metrics.paired_psnr_interval(a, b, resamples=0)


def test_noise_sqnr_matches_the_closed_form():
    ref = torch.full((4, 2, 3, 3), 2.0)
    # |ref|^2 = 4 n, |err|^2 = (0.02)^2 n  ->  10 log10(4 / 4e-4) = 40 dB
    assert metrics.noise_sqnr(ref, ref + 0.02) == pytest.approx(40.0)
    assert metrics.noise_sqnr(ref, ref) == metrics.PSNR_CAP_DB
    with pytest.raises(InputError, match="same shape"):
        metrics.noise_sqnr(ref, ref[:1])


def test_sqnr_by_timestep_per_step_mean_and_pooled():
    records = [(torch.ones(2, 1, 2, 2), torch.full((2,), float(t)), torch.tensor([0, 1])) for t in (10, 500)]
    # reference eps = 1 (learned-variance channel 2 = 0); error 0.01 at t=10 (40 dB) and 0.1 at t=500 (20 dB)
    ref = lambda x, t, y: torch.cat([torch.ones_like(x), torch.zeros_like(x)], 1)  # noqa: E731
    test = lambda x, t, y: torch.cat([1 + torch.where(t[0] < 100, 0.01, 0.1) * torch.ones_like(x), 5 + x], 1)  # noqa: E731
    out = metrics.sqnr_by_timestep(ref, test, records, channels=1)
    assert [r["t"] for r in out["per_timestep"]] == [10.0, 500.0]
    assert [r["sqnr_db"] for r in out["per_timestep"]] == [pytest.approx(40.0), pytest.approx(20.0)]
    assert out["mean_db"] == pytest.approx(30.0)
    assert out["pooled_db"] == pytest.approx(10 * np.log10(2 / (0.01**2 + 0.1**2)))
