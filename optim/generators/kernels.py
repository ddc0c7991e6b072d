"""The step kernels: each denoising step as a Gaussian action, and its log-probability.

Every family samples a chain ``x_T -> ... -> x_0`` whose steps are Gaussian: ``x_prev ~ N(mean, std^2)``
with ``mean`` a function of the network's (guided) prediction and ``std`` fixed by the schedule. The
log-probability of a drawn ``x_prev`` is the Gaussian log-density averaged over the latent elements (as
ddpo-pytorch and Flow-GRPO do, so ratios stay near 1), computed in fp32. Scoring a stored step runs the
same arithmetic with ``prev_sample`` given instead of ``noise``: with unchanged weights the ratio is 1.
Two policies' kernels at one step share the std, so their KL is ``||mean_p - mean_q||^2 / (2 std^2)``.

Two kernels, one per kind of model:

- ``ddim_step``: stochastic DDIM (REFERENCES section 3), for the epsilon / v-prediction UNets
  (Stable Diffusion 1.x/2.x, SDXL)::

      pred_x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)
      var     = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
      std     = eta sqrt(var)
      mean    = sqrt(a_prev) pred_x0 + sqrt(1 - a_prev - std^2) eps

  A step whose variance is zero is deterministic: the last step of a scheduler with
  ``set_alpha_to_one=True`` lands on ``a_prev = 1`` (some SD fine-tunes ship that). It moves to its mean,
  returns std 0 and a log-probability of exactly 0 under every policy: it has no log-probability, the
  trajectory lists it in ``fixed_steps`` and updates never train it (``Trajectory.scored_steps``).

- ``flow_sde_step``: the Flow-GRPO SDE (Liu et al. 2025; REFERENCES section 9), for rectified-flow
  transformers (Stable Diffusion 3 / 3.5, FLUX), which predict the velocity ``v = eps - x0`` of
  ``x_s = (1 - s) x0 + s eps``. With ``dt = s_next - s < 0`` and noise level ``a``::

      std_s = a sqrt(s / (1 - s))          (at s = 1 the next sigma stands in the denominator)
      mean  = x (1 + std_s^2 dt / (2 s)) + v (1 + std_s^2 (1 - s) / (2 s)) dt
      std   = std_s sqrt(-dt)

  Why this kernel and not DanceGRPO's (``std = eta sqrt(-dt)`` with a score correction): Flow-GRPO's SDE
  is derived to have the same marginals as the model's ODE for every ``a``, its noise shrinks with the
  noise level ``s`` of the state (so late steps, which fix details, stay nearly deterministic and the
  images stay close to the ODE sampler's), and it is the kernel behind the published SD 3.5 results with
  documented defaults (``a = 0.7``, 10 sampling steps while training). Either kernel is valid as long as
  sampling and scoring use the same one; this module is the only place either is written.
"""

from __future__ import annotations

import math

import torch

DEFAULT_NOISE_LEVEL = 0.7  # Flow-GRPO's noise level a for SD 3.5 and FLUX
MAX_NOISE_LEVEL = 1.0  # the highest noise level a accepted (``check_noise_level`` says why)


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


def _draw_or_score(mean: torch.Tensor, std: float, noise, prev_sample):
    """``(x_prev, log_prob)``: draw ``mean + std * noise``, or score the given ``prev_sample``. A step with
    std 0 is deterministic: it moves to its mean (``mean + 0 * noise`` is ``mean``) and its log-probability is 0."""
    if (noise is None) == (prev_sample is None):
        raise ValueError("give exactly one of noise (to sample) or prev_sample (to score)")
    x_prev = mean + std * noise if prev_sample is None else prev_sample
    if std == 0.0:
        return x_prev, torch.zeros(mean.shape[0], device=mean.device)
    return x_prev, gaussian_log_prob(x_prev, mean, std)


def ddim_std(alpha_t: float, alpha_prev: float, eta: float) -> float:
    """The std of the stochastic DDIM step from cumulative alpha ``alpha_t`` to ``alpha_prev``: fixed by the schedule."""
    if eta <= 0:
        raise ValueError("eta must be > 0: with eta = 0 DDIM is deterministic and has no log-probability")
    variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
    return eta * math.sqrt(max(variance, 0.0))


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
    stored transition (the re-evaluation GRPO needs). A zero-variance step (``a_prev = 1``) is
    deterministic: ``x_prev = mean``, std 0, log-prob 0.
    """
    std = ddim_std(alpha_t, alpha_prev, eta)
    pred_x0 = (x_t - math.sqrt(1 - alpha_t) * eps) / math.sqrt(alpha_t)
    direction = math.sqrt(max(1 - alpha_prev - std**2, 0.0)) * eps
    mean = math.sqrt(alpha_prev) * pred_x0 + direction
    x_prev, log_prob = _draw_or_score(mean, std, noise, prev_sample)  # std 0: set_alpha_to_one's last step
    return x_prev, log_prob, mean, std


def check_noise_level(noise_level: float) -> float:
    """The Flow-GRPO SDE's noise level ``a`` as a float; a ``ValueError`` saying why outside ``(0, MAX_NOISE_LEVEL]``.

    0 is the ODE, which has no log-probability. The upper bound 1: Flow-GRPO and DanceGRPO treat their
    noise level as a setting in [0, 1] (Flow-GRPO trains SD 3.5 at 0.7), and the kernel shows why not
    more. Its first step (``s = 1`` to the schedule's second sigma ``s1``, with ``s1`` in the denominator)
    has ``std = a`` whatever the schedule: at ``a = 1`` it adds as much fresh noise as the initial latent
    holds. And each step's mean weighs the current latent by ``1 - a^2 |dt| / (2 (1 - s))``: at most
    ``1 - 0.58 a^2`` over SD 3's schedule (shift 3) and FLUX's (``mu`` 1.16) at 10 steps, ``1 - 0.92 a^2``
    at 3 steps, zero at ``a`` of about 1.3 and 1.04. Past that zero a step's mean points away from the
    latent it starts from: it flips it instead of denoising it. At ``a <= 1`` those schedules keep the
    weight positive from 3 steps up (a larger shift needs more steps, or a lower level).
    """
    if not 0 < noise_level <= MAX_NOISE_LEVEL:
        raise ValueError(f"noise_level must be in (0, {MAX_NOISE_LEVEL:g}], got {noise_level}: 0 is the ODE, which has "
                         f"no log-probability, and above {MAX_NOISE_LEVEL:g} the SDE's first step adds more noise than "
                         f"the initial latent holds (Flow-GRPO uses {DEFAULT_NOISE_LEVEL:g})")
    return float(noise_level)


def flow_sde_std(sigma: float, sigma_next: float, sigma_max: float, noise_level: float) -> tuple[float, float]:
    """``(std_s, std)`` of the Flow-GRPO SDE step from ``sigma`` to ``sigma_next``; ``sigma_max`` is the
    schedule's second sigma, which stands in the denominator at ``sigma = 1``."""
    std_s = noise_level * math.sqrt(sigma / (1 - (sigma_max if sigma >= 1.0 else sigma)))
    return std_s, std_s * math.sqrt(sigma - sigma_next)


def flow_sde_step(
    velocity: torch.Tensor,
    x: torch.Tensor,
    sigma: float,
    sigma_next: float,
    sigma_max: float,
    noise_level: float,
    noise: torch.Tensor | None = None,
    prev_sample: torch.Tensor | None = None,
):
    """One Flow-GRPO SDE step from noise level ``sigma`` to ``sigma_next``: ``(x_prev, log_prob, mean, std)``.

    ``velocity``: the (guided) velocity prediction at ``x``, fp32. Give ``noise`` to draw, or
    ``prev_sample`` to score a stored transition, as ``ddim_step``. ``noise_level``: in ``(0, MAX_NOISE_LEVEL]``,
    which the flow families check once, when the level is set (``check_noise_level``); a room's eta in
    (0, 1] only lowers it.
    """
    if not 0 <= sigma_next < sigma <= 1:
        raise ValueError(f"a flow step goes from a higher noise level to a lower one in [0, 1], got {sigma} -> {sigma_next}")
    dt = sigma_next - sigma
    std_s, std = flow_sde_std(sigma, sigma_next, sigma_max, noise_level)
    mean = x * (1 + std_s**2 / (2 * sigma) * dt) + velocity * (1 + std_s**2 * (1 - sigma) / (2 * sigma)) * dt
    x_prev, log_prob = _draw_or_score(mean, std, noise, prev_sample)
    return x_prev, log_prob, mean, std


def gaussian_kl(mean_p: torch.Tensor, mean_q: torch.Tensor, std: float) -> torch.Tensor:
    """KL(N(mean_p, std^2) || N(mean_q, std^2)) per sample, averaged over elements like the log-prob.

    Two policies' step kernels share the std (it depends only on the schedule), so the KL is
    ``||mean_p - mean_q||^2 / (2 std^2)``: the KL term of GRPO and the trust-region check of updates.
    A deterministic step (std 0) has no kernel to compare and counts 0; updates never train one.
    """
    if std == 0:
        return torch.zeros(mean_p.shape[0], device=mean_p.device)
    return ((mean_p - mean_q) ** 2 / (2 * std**2)).flatten(1).mean(dim=1)
