import pytest
import torch

from ditrt.contracts.errors import ConfigError
from ditrt.diffusion.schedule import linear_betas, make_schedule, space_timesteps


def test_linear_betas_endpoints():
    b = linear_betas()
    assert len(b) == 1000 and b.dtype == torch.float64
    assert b[0].item() == pytest.approx(1e-4) and b[-1].item() == pytest.approx(0.02)


def test_respacing_with_all_steps_equals_the_plain_schedule():
    plain = make_schedule("1000")
    assert torch.equal(plain.timestep_map, torch.arange(1000))
    assert torch.allclose(plain.betas, linear_betas(), rtol=1e-12, atol=0)
    assert torch.allclose(plain.alphas_cumprod, torch.cumprod(1 - linear_betas(), 0), rtol=1e-12)


@pytest.mark.parametrize("spacing,count", [("250", 250), ("100", 100), ("50", 50), ("ddim50", 50), ("10,15,20", 45)])
def test_respaced_schedules_keep_the_base_alphas_cumprod(spacing, count):
    s = make_schedule(spacing)
    assert s.num_steps == count and s.timestep_map[0] == 0
    base = torch.cumprod(1 - linear_betas(), 0)
    assert torch.allclose(s.alphas_cumprod, base[s.timestep_map], rtol=1e-10)


def test_known_spacings():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    kept = space_timesteps(1000, "250")
    assert kept[0] == 0 and kept[-1] == 999 and len(kept) == 250
    # the reference code accumulates a float stride of 999/249 and rounds: spot values
    assert kept[1] == 4 and kept[2] == 8 and kept[124] == 497


@pytest.mark.parametrize("bad", ["0", "-5", "abc", "ddim0", "2000"])
def test_bad_step_counts_are_user_errors(bad):
    with pytest.raises(ConfigError):
        make_schedule(bad)


def test_posterior_matches_closed_forms():
    s = make_schedule("250")
    i = torch.tensor([0, 1, 100, 249])
    acp = s.alphas_cumprod[i]
    acp_prev = torch.where(i > 0, s.alphas_cumprod[(i - 1).clamp(min=0)], torch.ones(4, dtype=torch.float64))
    beta = s.betas[i]
    x0 = torch.randn(4, 1, 2, 2, dtype=torch.float64)
    xt = torch.randn(4, 1, 2, 2, dtype=torch.float64)
    mean, var, logvar = s.q_posterior(x0, xt, i)
    # Ho et al. eq. 7
    exp_mean = (acp_prev.sqrt() * beta / (1 - acp)).view(-1, 1, 1, 1) * x0 + (
        (1 - beta).sqrt() * (1 - acp_prev) / (1 - acp)
    ).view(-1, 1, 1, 1) * xt
    exp_var = ((1 - acp_prev) / (1 - acp) * beta).view(-1, 1, 1, 1)
    assert torch.allclose(mean, exp_mean, rtol=1e-10)
    assert torch.allclose(var, exp_var, rtol=1e-10)
    assert var[0].item() == 0 and logvar[0].item() == pytest.approx(torch.log(exp_var[1]).item())


def test_posterior_is_the_gaussian_product_of_forward_marginals():
    """q(x_{t-1}|x_t,x_0) from Bayes' rule on two Gaussians, done numerically."""
    s = make_schedule("100")
    i = torch.tensor([37])
    x0, xt = torch.tensor([[[[0.3]]]], dtype=torch.float64), torch.tensor([[[[-1.2]]]], dtype=torch.float64)
    a_prev = s.alphas_cumprod[36]
    b = s.betas[37]
    # prior x_{t-1} ~ N(sqrt(a_prev) x0, 1 - a_prev); likelihood x_t ~ N(sqrt(1-b) x_{t-1}, b)
    prec = 1 / (1 - a_prev) + (1 - b) / b
    mean = ((a_prev.sqrt() * 0.3) / (1 - a_prev) + (1 - b).sqrt() * -1.2 / b) / prec
    m, v, _ = s.q_posterior(x0, xt, i)
    assert m.item() == pytest.approx(mean.item(), rel=1e-9) and v.item() == pytest.approx((1 / prec).item(), rel=1e-9)


def test_learned_range_variance_interpolates_between_posterior_and_beta():
    s = make_schedule("50")
    i = torch.tensor([10, 10, 10])
    xt = torch.zeros(3, 1, 1, 1, dtype=torch.float64)
    v = torch.tensor([-1.0, 1.0, 0.0], dtype=torch.float64).view(3, 1, 1, 1)
    _, logvar, _ = s.p_mean_variance(torch.cat([torch.zeros_like(xt), v], 1), xt, i)
    lo, hi = s.posterior_log_variance_clipped[10].item(), torch.log(s.betas[10]).item()
    assert logvar.flatten().tolist() == pytest.approx([lo, hi, (lo + hi) / 2], rel=1e-12)
