"""The stochastic DDIM step and its log-probability, against hand-worked numbers and diffusers."""

import math

import pytest
import torch
from diffusers import DDIMScheduler

from optim.logprob import ddim_step, epsilon_from_output, gaussian_log_prob, step_alphas


def test_gaussian_log_prob_matches_hand_computed_density():
    # element 1: x=1, mean=0.5, std=0.5 -> -0.25/0.5 - ln 0.5 - ln sqrt(2 pi) = -0.7257914
    # element 2: x=2, mean=2,   std=0.5 ->  0     - ln 0.5 - ln sqrt(2 pi) = -0.2257914
    x = torch.tensor([[1.0, 2.0]])
    mean = torch.tensor([[0.5, 2.0]])
    assert gaussian_log_prob(x, mean, 0.5).item() == pytest.approx((-0.7257914 - 0.2257914) / 2, abs=1e-6)


def test_ddim_step_mean_and_std_match_the_formulas_by_hand():
    # eps=0.1, x_t=1, a_t=0.5, a_prev=0.8, eta=1:
    # pred_x0 = (1 - sqrt(.5)*.1)/sqrt(.5) = 1.3142136; var = 0.2/0.5*(1 - 0.5/0.8) = 0.15
    # mean = sqrt(.8)*1.3142136 + sqrt(1 - .8 - .15)*.1 = 1.1978290
    eps, x_t = torch.full((1, 1), 0.1), torch.ones(1, 1)
    x_prev, log_prob, mean, std = ddim_step(eps, x_t, 0.5, 0.8, eta=1.0, noise=torch.zeros(1, 1))
    assert std == pytest.approx(math.sqrt(0.15))
    assert mean.item() == pytest.approx(1.1978290, abs=1e-6)
    assert x_prev.item() == pytest.approx(1.1978290, abs=1e-6)  # zero noise lands on the mean
    assert log_prob.item() == pytest.approx(-math.log(math.sqrt(0.15)) - 0.5 * math.log(2 * math.pi), abs=1e-6)


def test_scoring_a_drawn_sample_gives_its_gaussian_log_prob():
    torch.manual_seed(0)
    eps, x_t, z = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    x_prev, drawn_log_prob, _, std = ddim_step(eps, x_t, 0.3, 0.45, eta=0.7, noise=z)
    _, scored, _, _ = ddim_step(eps, x_t, 0.3, 0.45, eta=0.7, prev_sample=x_prev)
    expected = (-(z**2) / 2 - math.log(std) - 0.5 * math.log(2 * math.pi)).flatten(1).mean(1)
    assert torch.allclose(scored, expected, atol=1e-5)
    assert torch.equal(scored, drawn_log_prob)


def test_step_agrees_with_diffusers_ddim_scheduler():
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1
    )
    scheduler.set_timesteps(20)
    torch.manual_seed(1)
    x_t, eps, z = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for t in (scheduler.timesteps[0], scheduler.timesteps[10], scheduler.timesteps[-1]):
        a_t, a_prev = step_alphas(scheduler, int(t), 20)
        ours, _, _, _ = ddim_step(eps, x_t, a_t, a_prev, eta=1.0, noise=z)
        theirs = scheduler.step(eps, t, x_t, eta=1.0, variance_noise=z).prev_sample
        assert torch.allclose(ours, theirs, atol=1e-5), f"timestep {int(t)}"


def test_deterministic_step_is_refused_with_a_reason():
    with pytest.raises(ValueError, match="eta must be > 0"):
        ddim_step(torch.zeros(1, 1), torch.zeros(1, 1), 0.5, 0.8, eta=0.0, noise=torch.zeros(1, 1))


def test_both_kernels_take_exactly_one_of_noise_or_prev_sample_also_at_a_zero_variance_step():
    from optim.generators.kernels import flow_sde_step

    x, zero = torch.ones(1, 1), torch.zeros(1, 1)
    steps = {"ddim": lambda **given: ddim_step(zero, x, 0.5, 0.8, eta=1.0, **given),
             "ddim, a_prev = 1": lambda **given: ddim_step(zero, x, 0.5, 1.0, eta=1.0, **given),  # std 0
             "flow": lambda **given: flow_sde_step(zero, x, 0.5, 0.25, 0.9, 0.7, **given)}
    for step in steps.values():
        for given in ({}, {"noise": zero, "prev_sample": x}):
            with pytest.raises(ValueError, match="give exactly one of noise"):
                step(**given)
    # the zero-variance step moves to its mean and scores 0, drawn or scored
    x_prev, log_prob, mean, std = steps["ddim, a_prev = 1"](noise=torch.full((1, 1), 3.0))
    assert std == 0.0 and torch.equal(x_prev, mean) and torch.equal(log_prob, torch.zeros(1))
    assert torch.equal(steps["ddim, a_prev = 1"](prev_sample=x_prev)[1], torch.zeros(1))


def test_v_prediction_converts_to_epsilon():
    # x_t = sqrt(a) x0 + sqrt(1-a) eps and v = sqrt(a) eps - sqrt(1-a) x0  =>  eps = sqrt(a) v + sqrt(1-a) x_t
    a, x0, eps = 0.36, torch.tensor([2.0]), torch.tensor([-1.0])
    x_t = math.sqrt(a) * x0 + math.sqrt(1 - a) * eps
    v = math.sqrt(a) * eps - math.sqrt(1 - a) * x0
    assert torch.allclose(epsilon_from_output(v, x_t, a, "v_prediction"), eps, atol=1e-6)
    with pytest.raises(ValueError, match="sample"):
        epsilon_from_output(v, x_t, a, "sample")
