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
