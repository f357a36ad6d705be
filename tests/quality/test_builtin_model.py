"""The built-in model draws recognisable digits of the requested class (a real threshold)."""

import pytest
import torch

from ditrt.contracts.model_config import CONFIGS
from ditrt.models.builtin import BUILTIN_DIT, load_model
from ditrt.models.checkpoints import read_checkpoint_meta
from ditrt.quality import metrics


def test_builtin_weights_are_small_and_described():
    assert BUILTIN_DIT.stat().st_size <= 20 * 2**20
    meta = read_checkpoint_meta(BUILTIN_DIT)
    assert meta["training"]["steps"] >= 1000 and meta["training"]["model"] == "ditrt-digits"
    assert load_model("builtin").config == CONFIGS["ditrt-digits"]


@pytest.mark.slow  # tens of seconds on one thread: 50-step sampling of enough digits to judge accuracy (tests/conftest.py)
def test_builtin_samples_are_digits_of_the_requested_class(builtin_samples):
    images, labels = builtin_samples["images"], builtin_samples["labels"]
    assert images.shape == (60, 1, 8, 8) and labels == [i % 10 for i in range(60)]
    assert torch.isfinite(torch.from_numpy(images)).all()
    assert metrics.class_accuracy(images, labels) >= 0.9
    assert metrics.fd_to_real(images) < 10 * metrics.fd_floor() + 10
