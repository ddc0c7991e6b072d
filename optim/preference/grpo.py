"""GRPO on the denoising chain: group-normalised advantages and a clipped surrogate, KL to the reference.

Each stochastic DDIM step is a Gaussian action (``optim.logprob``). For a ranked group:

- advantages ``A = (r - mean) / (std + eps)``, clipped to +-``advantage_clip``. The std convention
  follows TRL's GRPOTrainer: the SAMPLE std (``torch.std``, ddof = 1), and ``scale_rewards`` picks
  the std of the group (TRL's default), of the whole batch of groups, or none (``A = r - mean``).
  Worked check: rewards (1, 0.5, 0) give advantages (1, 0, -1) with the group's sample std; the
  population std would give +-1.2247. A group of one, or of equal rewards, has nothing to compare:
  its advantages are 0.
- per trained step: ``ratio = exp(log_prob - old_log_prob)``, the clipped surrogate
  ``max(-A ratio, -A clamp(ratio, 1 - clip, 1 + clip))``, plus ``kl_weight`` times the KL of the step
  kernel to the reference policy (adapters disabled), ``||mean - mean_ref||^2 / (2 std^2)``.

The guided noise prediction is recomputed exactly as in sampling (``Policy.score_step``), so with
unchanged weights the ratio is exactly 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from optim.logprob import gaussian_kl
from optim.policy import Policy
from optim.trajectory import Trajectory

SCALES = ("group", "batch", "none")
STEP_WEIGHTINGS = ("uniform", "noise")


@dataclass
class GRPOConfig:
    clip_range: float = 0.2  # wide: the KL trust region of each update bounds the move (README's sweep)
    # beta; the README's sweeps: 0.01 lost 12 points of pass rate on 30 groups; with the early 30% of the steps
    # trained, 0.05 moved the contrast expert's images further but made 16% of them worse, 0.07 kept the pass rate
    kl_weight: float = 0.07
    scale_rewards: str = "group"  # "group" | "batch" | "none", as TRL's GRPOTrainer
    advantage_clip: float = 5.0
    eps: float = 1e-4
    step_weighting: str = "uniform"  # "uniform" | "noise": how a group's weight is spread over its trained steps


def group_advantages(rewards: list[torch.Tensor], config: GRPOConfig = GRPOConfig()) -> list[torch.Tensor]:
    """Advantages for each group's rewards: centred on the group mean, scaled as configured."""
    if config.scale_rewards not in SCALES:
        raise ValueError(f"scale_rewards must be one of {', '.join(SCALES)}, got {config.scale_rewards!r}")
    everything = torch.cat(rewards)
    batch_std = everything.std() if everything.numel() > 1 else torch.tensor(0.0)
    advantages = []
    for group in rewards:
        centred = group - group.mean()
        if group.numel() < 2 or torch.all(centred == 0):
            advantages.append(torch.zeros_like(group))
            continue
        scale = {"group": group.std() + config.eps, "batch": batch_std + config.eps, "none": 1.0}[config.scale_rewards]
        advantages.append((centred / scale).clamp(-config.advantage_clip, config.advantage_clip))
    return advantages


@dataclass
class GRPOStepTerms:
    loss: torch.Tensor  # scalar, with grad when computed outside no_grad
    ratio: torch.Tensor  # (n,)
    kl: torch.Tensor  # (n,) KL of the step kernel to the reference
    clipped: torch.Tensor  # (n,) bool: the clip was active for this candidate
    approx_kl: torch.Tensor  # scalar: 0.5 mean (log_prob - old)^2, the usual PPO diagnostic
    mean: torch.Tensor  # (n, ...) the step kernel's mean under the current weights (the trust region's KL)
    std: float  # the step kernel's std (fixed by the schedule)


def grpo_step(policy: Policy, trajectory: Trajectory, step: int, advantages: torch.Tensor, config: GRPOConfig,
              reference_mean: torch.Tensor | None = None, rows: slice = slice(None)) -> GRPOStepTerms:
    """The GRPO loss of one stored denoising step of one group (or of its candidates ``rows``: a
    micro-batch), under the current weights; the loss is the mean over those candidates.

    ``advantages``: the whole group's. ``reference_mean``: the reference policy's kernel mean at this
    step for ``rows``, when the caller has it already (it does not change during an update); computed
    here otherwise.
    """
    log_prob, mean, std = policy.score_step(trajectory, step, rows)
    if reference_mean is None:
        reference_mean = reference_kernel_mean(policy, trajectory, step, rows)
    old = trajectory.log_probs[rows, step].to(log_prob.device)
    advantages = advantages[rows].to(log_prob.device)
    ratio = torch.exp(log_prob - old)
    clipped_ratio = ratio.clamp(1.0 - config.clip_range, 1.0 + config.clip_range)
    surrogate = torch.maximum(-advantages * ratio, -advantages * clipped_ratio)
    kl = gaussian_kl(mean, reference_mean.to(mean.device), std)
    return GRPOStepTerms(
        loss=(surrogate + config.kl_weight * kl).mean(),
        ratio=ratio.detach(),
        kl=kl.detach(),
        clipped=((ratio - 1.0).abs() > config.clip_range).detach(),
        approx_kl=(0.5 * (log_prob - old) ** 2).mean().detach(),
        mean=mean.detach(),
        std=std,
    )


@torch.no_grad()
def reference_kernel_mean(policy: Policy, trajectory: Trajectory, step: int, rows: slice = slice(None)) -> torch.Tensor:
    """The reference policy's (adapters disabled) step-kernel mean at a stored step, for candidates ``rows``."""
    with policy.reference():
        return policy.score_step(trajectory, step, rows)[1]


def micro_batches(n: int, size: int) -> list[slice]:
    """``range(n)`` in consecutive slices of at most ``size`` rows; one slice when ``size`` is 0 (no limit)."""
    if size < 0:
        raise ValueError(f"micro_batch must be 0 (no limit) or positive, got {size}")
    size = size or n
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def step_weigher(config: GRPOConfig, policy: Policy) -> Callable[[Trajectory, int], float] | None:
    """What ``grpo_pass`` spreads a group's weight by: each step's kernel std (``"noise"``), or nothing (evenly).

    Why the std: a step's log-probability gradient carries ``1 / std`` (``d log_prob / d mean = (x - mean) /
    std^2``, and ``x - mean`` is ``std`` times the noise drawn), so with equal weights the steps near the end,
    where the std is smallest, dominate the gradient though their noise decides little of the image. On the
    embedded model (20 DDIM steps) a GRPO group's adapter gradient was 0.005-0.017 at each of the first 18
    steps and 0.07-0.11 at the 19th (std 0.04 against 0.64 at the first; ``tests/benchmarks/bench_step_gradients.py``);
    weighed by the std, 0.005-0.019 at every step but the last (TempFlow-GRPO's noise-aware weighting).
    "uniform" stays the default: over the early window that updates train the stds differ by a quarter,
    and with later steps in the window the weighting did not steadily help (the README's sweep).
    """
    if config.step_weighting not in STEP_WEIGHTINGS:
        raise ValueError(f"step_weighting must be one of {', '.join(STEP_WEIGHTINGS)}, got {config.step_weighting!r}")
    return policy.step_std if config.step_weighting == "noise" else None


def grpo_pass(trajectories: list[Trajectory], advantages: list[torch.Tensor], run_step,
              weights: list[float] | None = None, steps: list[list[int]] | None = None, micro_batch: int = 0,
              step_std: Callable[[Trajectory, int], float] | None = None) -> dict:
    """The trained steps of every group through ``run_step``, and the metrics averaged over them.

    ``run_step(group, trajectory, step, rows, advantage, weight, last)`` computes the ``GRPOStepTerms`` of
    that step of group number ``group`` for the candidates ``rows`` (a slice) and, when training, back-propagates
    ``weight * terms.loss``; ``last`` marks the final call, where a distributed run synchronises
    gradients. The in-process update (``optim.preference.update``) and the accelerate trainer (``optim.train``)
    differ only in that function.

    ``weights``: one loss weight per group (default equal; updates pass ``RankedGroup.weight()``, the
    experts' levels); ``steps``: the stored steps trained per group (default: all that carry a
    log-probability; an update's optimizer step gives the groups outside its minibatch none);
    ``micro_batch``: the most candidates per call (0: a whole group); ``step_std``: the kernel std of a
    trajectory's step (``step_weigher``), or None. Each group's weight is spread over its trained steps,
    evenly or in proportion to their stds, and over its candidates in proportion to the micro-batch's
    share of them, so the weights of the calls sum to 1 and the accumulated gradient is the whole batch's
    whatever the micro-batch.
    """
    steps = steps if steps is not None else [t.scored_steps() for t in trajectories]
    weights = weights if weights is not None else [1.0] * len(trajectories)
    total = sum(w for w, s in zip(weights, steps) if s)  # a group with no step to train here weighs nothing
    if not total > 0:
        raise ValueError("the groups' weights sum to zero: nothing to learn from")
    calls = []
    for g, (t, a, w, s) in enumerate(zip(trajectories, advantages, weights, steps)):
        spread = [step_std(t, j) for j in s] if step_std is not None else [1.0] * len(s)
        calls += [(g, t, j, rows, a, w / total * share / sum(spread) * (rows.stop - rows.start) / len(a))
                  for j, share in zip(s, spread) for rows in micro_batches(len(a), micro_batch)]
    totals = dict.fromkeys(("loss", "approx_kl", "kl_to_reference", "clip_fraction"), 0.0)
    ratios = []
    for i, (group, trajectory, step, rows, advantage, weight) in enumerate(calls):
        terms = run_step(group, trajectory, step, rows, advantage, weight, i == len(calls) - 1)
        for key, value in zip(totals, (terms.loss, terms.approx_kl, terms.kl.mean(), terms.clipped.float().mean())):
            totals[key] += value.item() * weight
        ratios.append(terms.ratio)
    ratios = torch.cat(ratios)
    return {**totals, "ratio_mean": ratios.mean().item(), "ratio_min": ratios.min().item(), "ratio_max": ratios.max().item()}
