import pytest
import torch

from ditrt.contracts.errors import ConfigError, InputError
from ditrt.diffusion.sampler import SamplerConfig, guided_output, sample
from ditrt.diffusion.schedule import linear_betas
from tests.conftest import TINY, random_dit

SHAPE = (4, 8, 8)


def _run(model, cfg, labels=(1, 2, 3), seeds=(5, 6, 7)):
    return sample(model, cfg, list(labels), list(seeds), num_classes=10, image_shape=SHAPE)


def test_seeded_run_is_bit_reproducible(tiny_dit):
    cfg = SamplerConfig(steps="20", cfg_scale=1.5)
    assert torch.equal(_run(tiny_dit, cfg), _run(tiny_dit, cfg))
    assert not torch.equal(_run(tiny_dit, cfg), _run(tiny_dit, cfg, seeds=(5, 6, 8)))


def test_a_sample_depends_only_on_its_own_seed_and_label(tiny_dit):
    cfg = SamplerConfig(steps="10")
    full = _run(tiny_dit, cfg)
    alone = _run(tiny_dit, cfg, labels=(2,), seeds=(6,))
    assert torch.allclose(full[1], alone[0], atol=1e-5)


class _Oracle:
    """The exact denoiser for data that is a single point c: eps = (x - sqrt(acp) c) / sqrt(1 - acp)."""

    def __init__(self, c):
        self.c = c
        self.acp = torch.cumprod(1 - linear_betas(), 0)

    def __call__(self, x, t, y):
        a = self.acp[t.long()].to(x.dtype).view(-1, 1, 1, 1)
        eps = (x - a.sqrt() * self.c) / (1 - a).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], 1)


@pytest.mark.parametrize("steps", ["250", "50", "ddim50"])
def test_golden_oracle_denoiser_recovers_the_data_point(steps):
    c = torch.linspace(-0.8, 0.8, 64).view(1, 1, 8, 8)
    x = sample(_Oracle(c), SamplerConfig(steps=steps, cfg_scale=1.0), [0, 1], [0, 1], num_classes=2, image_shape=(1, 8, 8))
    assert torch.allclose(x, c.expand(2, -1, -1, -1), atol=1e-4)


def test_cfg_scale_one_is_the_conditional_model(tiny_dit):
    x, t, y = torch.randn(2, *SHAPE), torch.tensor([3.0, 3.0]), torch.tensor([1, 2])
    assert torch.equal(guided_output(tiny_dit, x, t, y, null_class=10, cfg_scale=1.0, guidance="official"), tiny_dit(x, t, y))


def test_guidance_channels_official_vs_all(tiny_dit):
    x, t, y = torch.randn(2, *SHAPE), torch.tensor([3.0, 3.0]), torch.tensor([1, 2])
    cond, uncond = tiny_dit(x, t, y), tiny_dit(x, t, torch.tensor([10, 10]))
    off = guided_output(tiny_dit, x, t, y, null_class=10, cfg_scale=4.0, guidance="official")
    all_ = guided_output(tiny_dit, x, t, y, null_class=10, cfg_scale=4.0, guidance="all")
    guided = uncond + 4.0 * (cond - uncond)
    assert torch.allclose(off[:, :3], guided[:, :3], atol=1e-5) and torch.allclose(off[:, 3:], cond[:, 3:], atol=1e-6)
    assert torch.allclose(all_[:, :4], guided[:, :4], atol=1e-5) and torch.allclose(all_[:, 4:], cond[:, 4:], atol=1e-6)


def test_cfg_batches_cond_first_then_null_in_one_call():
    calls = []

    def spy(x, t, y):
        calls.append(y.tolist())
        return torch.zeros(x.shape[0], 8, 8, 8)

    sample(spy, SamplerConfig(steps="3"), [4, 5], [0, 1], num_classes=10, image_shape=SHAPE)
    assert calls == [[4, 5, 10, 10]] * 3


def test_class_ids_out_of_range_and_bad_settings_are_user_errors(tiny_dit):
    with pytest.raises(InputError, match="class id 10 is out of range"):
        _run(tiny_dit, SamplerConfig(steps="5"), labels=(1, 10, 2))
    with pytest.raises(InputError, match="one seed per label"):
        _run(tiny_dit, SamplerConfig(steps="5"), labels=(1, 2), seeds=(1,))
    with pytest.raises(ConfigError):
        SamplerConfig(steps="0")
    with pytest.raises(ConfigError):
        SamplerConfig(cfg_scale=0.5)


def test_ddim_is_deterministic_given_x_T():
    m = random_dit(TINY)
    a = _run(m, SamplerConfig(steps="ddim10", cfg_scale=1.0))
    b = _run(m, SamplerConfig(steps="ddim10", cfg_scale=1.0))
    assert torch.equal(a, b) and torch.isfinite(a).all()
