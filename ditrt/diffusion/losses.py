"""Training loss of Improved DDPM for learned-sigma models: L_simple + L_vlb.

The noise prediction is trained by mean-squared error; the variance channels by the variational
bound term with the mean held fixed (stop-gradient), as Nichol & Dhariwal's hybrid objective.
"""

from __future__ import annotations

import math

import torch

from ditrt.diffusion.schedule import Schedule


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, *, means, log_scales, bin_width: float = 2.0 / 255):
    """Log-likelihood of data in [-1, 1] quantized to bins of ``bin_width`` under a Gaussian."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_stdv * (centered + bin_width / 2))
    cdf_min = _approx_std_normal_cdf(inv_stdv * (centered - bin_width / 2))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(
        x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12)))
    )


def hybrid_loss(model, schedule: Schedule, x0: torch.Tensor, y: torch.Tensor, *, generator=None) -> torch.Tensor:
    """Mean over the batch of MSE(eps) + L_vlb (bits/dim, scaled by T/1000) at random timesteps."""
    n = x0.shape[0]
    i = torch.randint(0, schedule.num_steps, (n,), generator=generator, device=x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    xt = schedule.q_sample(x0, i, noise)
    out = model(xt, schedule.timestep_map.to(x0.device)[i].to(x0.dtype), y)
    c = x0.shape[1]
    eps, v = out[:, :c], out[:, c:]
    mse = ((noise - eps) ** 2).mean(dim=(1, 2, 3))
    # variance term: only v receives gradients from it
    mean, log_var, _ = schedule.p_mean_variance(torch.cat([eps.detach(), v], 1), xt, i)
    true_mean, _, true_log_var = schedule.q_posterior(x0, xt, i)
    kl = normal_kl(true_mean, true_log_var, mean, log_var).mean(dim=(1, 2, 3)) / math.log(2.0)
    nll = -discretized_gaussian_log_likelihood(x0, means=mean, log_scales=0.5 * log_var).mean(dim=(1, 2, 3)) / math.log(2.0)
    vb = torch.where(i == 0, nll, kl) * (schedule.num_steps / 1000.0)
    return (mse + vb).mean()
