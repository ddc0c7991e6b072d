"""Diffusion-DPO (Wallace et al. 2023) on preference pairs, generated or imported.

For a pair (winner w, loser l) of clean latents under one prompt, ONE timestep t and ONE noise are
drawn and used for both images, and the denoising error ``err = mean ||target - prediction||^2``
(over latent elements) is measured under the policy and under the reference (the same UNet with
its LoRA adapters disabled). The beta convention is the paper's, with the 0.5 factor:

    margin = -0.5 * beta * ((err_w - err_ref_w) - (err_l - err_ref_l))

- sigmoid loss ``-log sigmoid(margin)`` (the paper's); hinge ``relu(1 - margin)``; IPO
  ``(margin / beta - 1 / (2 beta))^2`` on the unscaled log-ratio difference, as TRL writes it.
- implicit reward of an image: ``-0.5 * beta * (err - err_ref)``; the margin is the winner's minus
  the loser's, and the implicit accuracy counts pairs with a positive margin (+0.5 for exact zeros).
- When the policy equals the reference the margin is exactly 0 and the sigmoid loss exactly ln 2.

Several (t, noise) draws per pair (``noise_draws``) average out the timestep's variance. Pairs carry
weights (the expert level); the loss is their weighted mean. Ties never reach here: they give no pair.
An update that back-propagates its pairs in micro-batches draws every pair's (t, noise) first
(``NoiseDraws.draw``) and hands each micro-batch its share (``NoiseDraws.pairs``), so the numbers are
those of one batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from optim.policy import Policy
from optim.trajectory import Condition

LOSS_TYPES = ("sigmoid", "hinge", "ipo")


@dataclass
class DPOConfig:
    beta: float = 5000.0
    loss_type: str = "sigmoid"
    noise_draws: int = 4


@dataclass
class NoiseDraws:
    """The (timestep, noise) of every pair and draw, shared by the pair's winner and loser."""

    timesteps: torch.Tensor  # (draws, P)
    noise: torch.Tensor  # (draws, P, C, h, w)

    @staticmethod
    def draw(policy: Policy, pairs: int, shape: tuple[int, ...], draws: int, generator: torch.Generator) -> "NoiseDraws":
        timesteps = torch.randint(0, policy.scheduler.config.num_train_timesteps, (draws * pairs,), generator=generator)
        noise = torch.randn((draws * pairs, *shape), generator=generator)
        return NoiseDraws(timesteps.view(draws, pairs), noise.view(draws, pairs, *shape))

    def pairs(self, rows: slice) -> "NoiseDraws":
        """The draws of some pairs only (a micro-batch)."""
        return NoiseDraws(self.timesteps[:, rows], self.noise[:, rows])


@dataclass
class DPOTerms:
    loss: torch.Tensor  # scalar: the weighted mean over pairs, with grad outside no_grad
    pair_loss: torch.Tensor  # (P,)
    margin: torch.Tensor  # (P,)
    winner_reward: torch.Tensor  # (P,) implicit rewards
    loser_reward: torch.Tensor  # (P,)
    accuracy: float  # implicit accuracy


def dpo_terms(
    policy: Policy,
    winners: torch.Tensor,
    losers: torch.Tensor,
    prompt_embeds: torch.Tensor | Condition,
    weights: torch.Tensor,
    config: DPOConfig,
    generator: torch.Generator | None = None,
    drawn: NoiseDraws | None = None,
) -> DPOTerms:
    """The DPO loss of P pairs of clean latents (P, C, h, w) with their prompt embeddings (P, L, D), or their
    ``Condition`` (the pooled embeddings too, for SDXL, SD 3 and FLUX).

    The (t, noise) draws come from ``generator``, or are given (``drawn``: a micro-batch's share of a batch's).
    """
    if config.loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {config.loss_type!r}")
    pairs, device = winners.shape[0], policy.device
    if drawn is None:
        drawn = NoiseDraws.draw(policy, pairs, tuple(winners.shape[1:]), config.noise_draws, generator)
    # one (t, noise) per pair and draw, shared by the winner and the loser; draw-major, as the latents below
    draws, timesteps, noise = drawn.timesteps.shape[0], drawn.timesteps.reshape(-1), drawn.noise.flatten(0, 1)
    latents = torch.cat([winners.repeat(draws, 1, 1, 1), losers.repeat(draws, 1, 1, 1)]).to(device)
    inputs = (latents, torch.cat([noise, noise]).to(device), torch.cat([timesteps, timesteps]).to(device),
              (prompt_embeds if isinstance(prompt_embeds, Condition) else Condition(prompt_embeds)).repeat(2 * draws).to(device))
    # the family's own per-sample error, in fp32: the epsilon or v target of a DDIM family, the velocity
    # eps - x0 of a flow-matching one (noised to (1 - s) x0 + s eps)
    error = policy.denoising_error(*inputs).view(2, draws, pairs).mean(dim=1)
    with torch.no_grad(), policy.reference():
        reference_error = policy.denoising_error(*inputs).view(2, draws, pairs).mean(dim=1)
    implicit_reward = -0.5 * config.beta * (error - reference_error)  # (2, P): winners, losers
    margin = implicit_reward[0] - implicit_reward[1]
    if config.loss_type == "sigmoid":
        pair_loss = -F.logsigmoid(margin)
    elif config.loss_type == "hinge":
        pair_loss = F.relu(1.0 - margin)
    else:
        pair_loss = (margin / config.beta - 1.0 / (2.0 * config.beta)) ** 2
    weights = weights.to(device)
    detached = margin.detach()
    return DPOTerms(
        loss=(weights * pair_loss).sum() / weights.sum(),
        pair_loss=pair_loss.detach(),
        margin=detached,
        winner_reward=implicit_reward[0].detach(),
        loser_reward=implicit_reward[1].detach(),
        accuracy=implicit_accuracy(detached),
    )


def implicit_accuracy(margin: torch.Tensor) -> float:
    """Share of pairs whose winner's implicit reward is above the loser's (a tie counts half)."""
    return float(((margin > 0).float() + 0.5 * (margin == 0).float()).mean())
