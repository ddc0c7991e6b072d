"""Applying an update: K optimizer steps on the LoRA weights from ranked groups, then a new version.

One update takes ranked groups (the control room passes those not used yet), runs
``optimizer_steps`` AdamW steps with gradient-norm clipping on the adapters only, and saves the
result as a new version (``VersionStore.save`` writes then renames: a crash mid-update leaves the
last good version current). Guards, each with a plain report and the previous weights restored:

- a non-finite loss or gradient: no step is taken and nothing is saved;
- a trust region: after training, the KL of the new step kernels from the previous version's, on
  the groups' own stored chains, must stay within ``kl_budget``; otherwise the new version is
  refused and the previous one stays current.

Each update starts a fresh optimizer: a version is its adapter weights and nothing else.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch

from optim.dpo import DPOConfig, dpo_terms
from optim.groups import RankedGroup
from optim.grpo import GRPOConfig, group_advantages, grpo_pass, grpo_step
from optim.logprob import gaussian_kl
from optim.policy import Policy
from optim.versions import Version, VersionStore

ALGORITHMS = ("grpo", "dpo")


@dataclass
class UpdateConfig:
    algorithm: str = "grpo"
    learning_rate: float = 3e-4
    optimizer_steps: int = 4  # K
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    kl_budget: float = 1e-3  # largest mean step-kernel KL from the previous version (defaults move ~1e-5 per update)
    seed: int = 0  # DPO's timesteps and noise
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)


@dataclass
class UpdateResult:
    applied: bool
    version: Version | None  # the new version, or None when refused
    metrics: dict
    message: str


class UpdateRefused(Exception):
    """Raised inside an update to stop it; the message is what the page shows."""


def grpo_backward(policy: Policy, groups: list[RankedGroup], config: UpdateConfig) -> dict:
    """One optimizer step's worth of GRPO gradients over every group and stored step; its metrics."""
    advantages = group_advantages([g.rewards() for g in groups], config.grpo)

    def run_step(trajectory, step, advantage, weight, last):
        terms = grpo_step(policy, trajectory, step, advantage, config.grpo)
        check_finite(terms.loss, "GRPO loss")
        if torch.is_grad_enabled():
            (weight * terms.loss).backward()
        return terms

    return grpo_pass([g.trajectory for g in groups], advantages, run_step)


def dpo_pairs(groups: list[RankedGroup]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Winners' and losers' clean latents, prompt embeddings and weights for every ranked pair."""
    winners, losers, embeds, weights = [], [], [], []
    for group in groups:
        final = group.trajectory.latents[:, -1]
        for winner, loser, weight in group.pairs():
            winners.append(final[winner])
            losers.append(final[loser])
            embeds.append(group.trajectory.prompt_embeds[0])
            weights.append(weight)
    if not winners:
        raise UpdateRefused("no ranked pairs to learn from: every ranking is a single tier of ties")
    return torch.stack(winners), torch.stack(losers), torch.stack(embeds), torch.tensor(weights)


def dpo_backward(policy: Policy, groups: list[RankedGroup], config: UpdateConfig, generator: torch.Generator) -> dict:
    """One optimizer step's worth of Diffusion-DPO gradients over every ranked pair; its metrics."""
    terms = dpo_terms(policy, *dpo_pairs(groups), config.dpo, generator)
    check_finite(terms.loss, "DPO loss")
    if torch.is_grad_enabled():
        terms.loss.backward()
    return {"loss": terms.loss.item(), "implicit_accuracy": terms.accuracy, "margin_mean": float(terms.margin.mean()),
            "pairs": int(terms.margin.numel())}


def check_finite(value: torch.Tensor, what: str) -> None:
    value = value.detach()
    if not torch.isfinite(value).all():
        raise UpdateRefused(f"the {what} is not finite ({float(value.flatten()[0])}): no step was taken")


def step_kernels(policy: Policy, groups: list[RankedGroup]) -> list[tuple[torch.Tensor, float]]:
    """(mean, std) of every stored step's kernel under the current weights, group by group."""
    with torch.no_grad():
        return [policy.score_step(g.trajectory, j)[1:] for g in groups for j in range(len(g.trajectory.timesteps))]


def kl_between(before: list[tuple[torch.Tensor, float]], after: list[tuple[torch.Tensor, float]]) -> float:
    """Mean step-kernel KL of ``after`` from ``before`` (the kernels share their std)."""
    return float(torch.stack([gaussian_kl(new, old, std).mean() for (old, std), (new, _) in zip(before, after)]).mean())


def apply_update(policy: Policy, store: VersionStore, groups: list[RankedGroup], config: UpdateConfig = UpdateConfig()) -> UpdateResult:
    """Train the adapters on ``groups`` and save a new version, or refuse and keep the current one."""
    if config.algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}, got {config.algorithm!r}")
    unranked = [g.id for g in groups if not g.rankings]
    if not groups or unranked:
        raise ValueError(f"nothing to learn from: groups without a ranking: {', '.join(unranked)}" if unranked
                         else "nothing to learn from: no ranked groups were given")
    started = time.perf_counter()
    previous = policy.lora_state_dict()
    parameters = policy.lora_parameters()
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    history = []
    try:
        before = step_kernels(policy, groups)
        for _ in range(config.optimizer_steps):
            optimizer.zero_grad(set_to_none=True)
            if config.algorithm == "grpo":
                metrics = grpo_backward(policy, groups, config)
            else:
                metrics = dpo_backward(policy, groups, config, generator)
            grad_norm = torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
            check_finite(grad_norm, "gradient norm")
            optimizer.step()
            history.append({**metrics, "grad_norm": float(grad_norm)})
        kl = kl_between(before, step_kernels(policy, groups))
        if not math.isfinite(kl) or kl > config.kl_budget:
            raise UpdateRefused(
                f"the update moved the model too far: KL {kl:.4g} from the current version is over the budget "
                f"{config.kl_budget:g}; lower the learning rate or the number of steps"
            )
    except UpdateRefused as refusal:
        policy.load_lora_state_dict(previous)
        kept = policy.version or "the base model"
        return UpdateResult(False, None, {"steps": history}, f"update refused: {refusal}; {kept} stays current")
    except BaseException:  # out of memory, interrupted ...: the weights go back before the error goes on
        policy.load_lora_state_dict(previous)
        raise
    summary = {
        "algorithm": config.algorithm,
        "groups": [g.id for g in groups],
        "loss_first": history[0]["loss"],
        "loss_last": history[-1]["loss"],
        "kl_from_previous": kl,
        "wall_time_s": time.perf_counter() - started,
        "steps": history,
        "config": asdict(config),
    }
    parent = policy.version
    version = policy.save_version(store, algorithm=config.algorithm, metrics=summary)
    message = (f"{version.id} made from {parent or 'the base model'} by {config.algorithm.upper()} on {len(groups)} group(s): "
               f"loss {summary['loss_first']:.4g} -> {summary['loss_last']:.4g}, KL {kl:.3g}")
    return UpdateResult(True, version, summary, message)
