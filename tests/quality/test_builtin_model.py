"""The built-in model draws recognisable digits of the requested class (a real threshold)."""

import pytest
import torch

from ditrt.contracts.model_config import CONFIGS
from ditrt.diffusion.sample_set import generate
from ditrt.diffusion.sampler import SamplerConfig
from ditrt.models.builtin import BUILTIN_DIT, load_model
from ditrt.models.checkpoints import read_checkpoint_meta
from ditrt.quality import metrics


def test_builtin_weights_are_small_and_described():
    assert BUILTIN_DIT.stat().st_size <= 20 * 2**20
    meta = read_checkpoint_meta(BUILTIN_DIT)
    assert meta["training"]["steps"] >= 1000 and meta["training"]["model"] == "ditrt-digits"
    assert load_model("builtin").config == CONFIGS["ditrt-digits"]


@pytest.mark.slow  # 36-42 s on one thread: 250-step sampling of enough digits to judge accuracy
def test_builtin_samples_are_digits_of_the_requested_class():
    model = load_model("builtin")
    labels = [i % 10 for i in range(60)]
    images = generate(model, SamplerConfig(steps="50", cfg_scale=1.5, clip_denoised=True), labels, list(range(60)),
                      num_classes=10, image_shape=(1, 8, 8))  # fmt: skip
    assert torch.isfinite(torch.from_numpy(images)).all()
    assert metrics.class_accuracy(images, labels) >= 0.9
    assert metrics.fd_to_real(images) < 10 * metrics.fd_floor() + 10
