"""The stochastic DDIM step as a Gaussian policy, and its log-probability.

With eta > 0 each DDIM step draws ``x_{t-1} ~ N(mean, std^2)`` (REFERENCES section 3):

    pred_x0 = (x_t - sqrt(1 - a_t) * eps) / sqrt(a_t)
    var     = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std     = eta * sqrt(var)
    mean    = sqrt(a_prev) * pred_x0 + sqrt(1 - a_prev - std^2) * eps

and the log-probability of the drawn ``x_{t-1}`` is the Gaussian log-density, averaged over the
latent elements (as every public DDPO/GRPO code does, so ratios stay near 1). ``eps`` is the
classifier-free-guided prediction; training recomputes it the same way, so before any update the
ratio is exactly 1.
"""

from __future__ import annotations

import math

import torch


def step_alphas(scheduler, timestep: int, num_inference_steps: int) -> tuple[float, float]:
    """``(a_t, a_prev)``: cumulative alphas at ``timestep`` and at the step the DDIM move lands on."""
    alphas = scheduler.alphas_cumprod
    prev = timestep - scheduler.config.num_train_timesteps // num_inference_steps
    alpha_prev = alphas[prev] if prev >= 0 else scheduler.final_alpha_cumprod
    return float(alphas[timestep]), float(alpha_prev)


def epsilon_from_output(output: torch.Tensor, x_t: torch.Tensor, alpha_t: float, prediction_type: str):
    """The noise prediction, whatever the network was trained to predict."""
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return math.sqrt(alpha_t) * output + math.sqrt(1.0 - alpha_t) * x_t
    raise ValueError(f"unsupported prediction_type {prediction_type!r}: expected 'epsilon' or 'v_prediction'")


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: float | torch.Tensor) -> torch.Tensor:
    """Log-density of ``x`` under ``N(mean, std^2)``, averaged over all but the first dimension."""
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device)
    density = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - math.log(math.sqrt(2 * math.pi))
    return density.flatten(1).mean(dim=1)


def ddim_step(
    eps: torch.Tensor,
    x_t: torch.Tensor,
    alpha_t: float,
    alpha_prev: float,
    eta: float,
    noise: torch.Tensor | None = None,
    prev_sample: torch.Tensor | None = None,
):
    """One stochastic DDIM step: ``(x_prev, log_prob, mean, std)``.

    Give ``noise`` to draw ``x_prev = mean + std * noise``; give ``prev_sample`` instead to score a
    stored transition (the re-evaluation GRPO needs).
    """
    if eta <= 0:
        raise ValueError("eta must be > 0: with eta = 0 DDIM is deterministic and has no log-probability")
    if (noise is None) == (prev_sample is None):
        raise ValueError("give exactly one of noise (to sample) or prev_sample (to score)")
    pred_x0 = (x_t - math.sqrt(1 - alpha_t) * eps) / math.sqrt(alpha_t)
    variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
    std = eta * math.sqrt(variance)
    direction = math.sqrt(max(1 - alpha_prev - std**2, 0.0)) * eps
    mean = math.sqrt(alpha_prev) * pred_x0 + direction
    x_prev = mean + std * noise if prev_sample is None else prev_sample
    return x_prev, gaussian_log_prob(x_prev, mean, std), mean, std


def gaussian_kl(mean_p: torch.Tensor, mean_q: torch.Tensor, std: float) -> torch.Tensor:
    """KL(N(mean_p, std^2) || N(mean_q, std^2)) per sample, averaged over elements like the log-prob.

    Two policies' DDIM step kernels share the std (it depends only on the schedule), so the KL is
    ``||mean_p - mean_q||^2 / (2 std^2)``: the KL term of GRPO and the trust-region check of updates.
    """
    return ((mean_p - mean_q) ** 2 / (2 * std**2)).flatten(1).mean(dim=1)
