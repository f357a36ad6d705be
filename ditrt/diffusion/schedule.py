"""The Gaussian diffusion of DDPM / Improved DDPM as the official DiT and ADM code use it.

Linear betas over 1000 steps, respacing ("250", "100", "50", "ddim50"), the learned-range
variance of Improved DDPM, and the closed forms of q(x_t | x_0) and q(x_{t-1} | x_t, x_0).
Coefficients are computed in float64 (as the reference code does with NumPy) and cast to the
dtype of the tensor they multiply.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ditrt.contracts.errors import ConfigError

NUM_TRAIN_TIMESTEPS = 1000


def linear_betas(num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """Ho et al.'s linear schedule, rescaled so that any length keeps the same endpoints."""
    scale = 1000 / num_timesteps
    return torch.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=torch.float64)


def space_timesteps(num_timesteps: int, spacing: str) -> list[int]:
    """The training timesteps kept by a respacing string, ascending.

    ``"250"`` keeps 250 steps spread evenly (first and last included); ``"ddimN"`` keeps
    ``range(0, num_timesteps, stride)`` with the stride that gives exactly N steps. Comma-separated
    counts ("10,15,20") split the schedule into equal sections with their own counts.
    """
    spacing = str(spacing).strip()
    if spacing.startswith("ddim"):
        want = _positive_int(spacing[4:], spacing)
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == want:
                return list(range(0, num_timesteps, stride))
        raise ConfigError(f"cannot space {num_timesteps} steps into exactly {want} DDIM steps; try ddim50 or ddim25")
    counts = [_positive_int(c, spacing) for c in spacing.split(",")]
    size, extra = divmod(num_timesteps, len(counts))
    kept, start = [], 0
    for i, count in enumerate(counts):
        section = size + (1 if i < extra else 0)
        if count > section:
            raise ConfigError(f"cannot keep {count} steps from a section of {section}; use at most {num_timesteps} steps")
        stride = (section - 1) / (count - 1) if count > 1 else 1
        cur = 0.0
        for _ in range(count):  # accumulate like the reference code: rounding ties must match
            kept.append(start + round(cur))
            cur += stride
        start += section
    return sorted(set(kept))


def _positive_int(text: str, spacing: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n <= 0:
        raise ConfigError(f"invalid step count {spacing!r}: give a positive number of steps such as 250, 100, 50 or ddim50")
    return n


@dataclass
class Schedule:
    """A (possibly respaced) diffusion process. Index ``i`` runs over the kept steps;
    ``timestep_map[i]`` is the training timestep the model is conditioned on."""

    betas: torch.Tensor  # (S,) float64
    timestep_map: torch.Tensor  # (S,) int64
    spacing: str = "1000"
    alphas_cumprod: torch.Tensor = field(init=False)

    def __post_init__(self):
        b = self.betas
        self.num_steps = len(b)
        alphas = 1.0 - b
        self.alphas_cumprod = acp = torch.cumprod(alphas, 0)
        self.alphas_cumprod_prev = acp_prev = torch.cat([torch.ones(1, dtype=b.dtype), acp[:-1]])
        self.sqrt_alphas_cumprod = acp.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1 - acp).sqrt()
        self.sqrt_recip_alphas_cumprod = (1 / acp).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1 / acp - 1).sqrt()
        # q(x_{t-1} | x_t, x_0), Ho et al. eq. 6-7
        self.posterior_variance = b * (1 - acp_prev) / (1 - acp)
        # the variance is 0 at t = 0: clip the log with the value of t = 1
        self.posterior_log_variance_clipped = torch.log(torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = b * acp_prev.sqrt() / (1 - acp)
        self.posterior_mean_coef2 = (1 - acp_prev) * alphas.sqrt() / (1 - acp)
        self.log_betas = torch.log(b)

    # --- helpers -------------------------------------------------------------------------
    @staticmethod
    def _at(coef: torch.Tensor, i: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """coef[i] shaped (N, 1, 1, ...) for broadcasting against ``like``."""
        out = coef.to(like.device)[i.to(like.device)].to(like.dtype)
        return out.reshape(-1, *([1] * (like.ndim - 1)))

    # --- forward process ----------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, i: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(acp) x_0 + sqrt(1 - acp) eps."""
        return self._at(self.sqrt_alphas_cumprod, i, x0) * x0 + self._at(self.sqrt_one_minus_alphas_cumprod, i, x0) * noise

    def q_posterior(self, x0: torch.Tensor, xt: torch.Tensor, i: torch.Tensor):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = self._at(self.posterior_mean_coef1, i, xt) * x0 + self._at(self.posterior_mean_coef2, i, xt) * xt
        return mean, self._at(self.posterior_variance, i, xt), self._at(self.posterior_log_variance_clipped, i, xt)

    # --- reverse process ----------------------------------------------------------------
    def predict_x0(self, xt: torch.Tensor, i: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return self._at(self.sqrt_recip_alphas_cumprod, i, xt) * xt - self._at(self.sqrt_recipm1_alphas_cumprod, i, xt) * eps

    def predict_eps(self, xt: torch.Tensor, i: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        return (self._at(self.sqrt_recip_alphas_cumprod, i, xt) * xt - x0) / self._at(self.sqrt_recipm1_alphas_cumprod, i, xt)

    def p_mean_variance(self, model_output: torch.Tensor, xt: torch.Tensor, i: torch.Tensor, *, clip_denoised: bool = False):
        """Mean and log-variance of p(x_{t-1} | x_t) from a learned-sigma model output.

        ``model_output`` is (N, 2C, ...): noise prediction, then v in [-1, 1] which interpolates the
        log-variance between the posterior variance (v = -1) and beta_t (v = +1) (Nichol & Dhariwal).
        Returns ``(mean, log_variance, pred_x0)``.
        """
        c = xt.shape[1]
        if model_output.shape[1] != 2 * c:
            raise ConfigError(
                f"model output has {model_output.shape[1]} channels, expected {2 * c} (noise + learned variance); "
                "ditrt samples learned-sigma DiTs only"
            )
        eps, v = model_output[:, :c], model_output[:, c:]
        frac = (v + 1) / 2
        min_log = self._at(self.posterior_log_variance_clipped, i, xt)
        max_log = self._at(self.log_betas, i, xt)
        log_variance = frac * max_log + (1 - frac) * min_log
        x0 = self.predict_x0(xt, i, eps)
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        mean, _, _ = self.q_posterior(x0, xt, i)
        return mean, log_variance, x0


def make_schedule(spacing: str | int = "250", num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> Schedule:
    """The respaced schedule: betas recomputed so that the kept steps' alphas_cumprod are exact."""
    kept = space_timesteps(num_timesteps, str(spacing))
    base_acp = torch.cumprod(1.0 - linear_betas(num_timesteps), 0)
    betas, last = [], torch.tensor(1.0, dtype=torch.float64)
    for t in kept:
        betas.append(1 - base_acp[t] / last)
        last = base_acp[t]
    return Schedule(torch.stack(betas), torch.tensor(kept, dtype=torch.int64), spacing=str(spacing))
