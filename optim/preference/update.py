"""Applying an update: AdamW steps on the LoRA weights from ranked groups, then a new version.

One update takes ranked groups (the control room passes those not used yet, and may add groups the
reward model ranked), makes ``epochs`` passes over them with gradient-norm clipping on the adapters
only, and saves the result as a new version (``VersionStore.save`` writes then renames: a crash
mid-update leaves the last good version current).

What one update trains, and why:

- each pass shuffles the groups and takes one optimizer step per ``groups_per_step`` of them (near-equal
  minibatches), as PPO and DDPO do: an update of at most that many groups takes ``epochs`` full-batch
  steps, and more groups (the reward model's, above all) add steps, not only a better average. AdamW moves
  each adapter weight by about the learning rate a step whatever the gradient's size, so a full batch of
  more groups points the same few steps better but moves no further (on 30 contrast-ranked groups, 6 AI
  groups a update gave +0.89 sd in 8 full-batch steps, against +1.04 without them). And at least
  ``min_steps_per_pass`` (2) steps a pass, so that the five groups experts rank between two updates are
  not one full-batch step a pass either: on the learning benchmark's contrast expert without AI groups,
  3 + 2 groups a step moved the images +1.77 sd (win-rate 98%) against +1.37 (88%) with one step;

- a subset of each chain's denoising steps (``train_fraction``): the cost of a GRPO step is linear in
  the steps trained. ``train_window`` says which: ``"early"`` (the default) trains the first, noisiest
  steps, where a chain's global look (its contrast, its brightness) is decided, as Flow-GRPO's and
  MixGRPO's SDE windows do; ``"random"`` draws them afresh each update, as DDPO's
  ``timestep_fraction``; ``"mixed"`` trains the early window and half as many later steps drawn afresh
  for each group and update (the README's table of reward-model features says what each did). On one
  update of six ranked groups (8 sampling steps) the preferred attribute moved 0.33 sd with the early
  quarter, 0.17 +- 0.26 with a random quarter (its direction swung with the draw), 1.10 with the early
  half, 0.52 with the late half (at eight times the KL) and 0.68 with every step: the late steps add
  noise, not signal. A LoRA acts on every step, whatever steps it was
  trained on, and the later steps are where it spends variety: on a brightness-trained version (the early
  half trained), its adapters on in the first 3 of 20 steps only moved the images 0.41 sd at 2% less
  variety, on all 20 steps 0.83 sd at 20% less (``tests/benchmarks/bench_step_windows.py``). Hence the
  early 30% (6 of 20 steps), with GRPO's KL weight 0.07: on 30 groups as far as the early half at 0.1, at
  about half the loss of variety (the README's sweep);
- each group weighs its experts' levels (``RankedGroup.weight``): a level-3 expert's group counts three
  times a level-1 expert's, in GRPO as in DPO's pairs; AI-ranked groups weigh the configured AI weight;
  and GRPO gives each modality among the experts' groups the same share (``balance_modalities``, on by
  default; ``modality_balance``): an update's one brain MRI group counts as much as its four CTs together, so
  what the CTs teach the shared adapters does not drown what the MRI's experts said. On the learning
  benchmark's contrast expert without AI groups (the default), GRPO won 98%, 97% and 98% balanced, its brain
  MRIs better each time, against 98%, 86%, 97%, 97% and 98%; with 4 AI groups, and for the brightness expert,
  balanced and unbalanced did alike (the README's sweep);
- a fresh seed per update (unless ``seed`` is given) for the trained steps and DPO's timesteps and
  noise, recorded in the version's metrics.

Memory: an update runs inside ``policy.training()`` (gradient checkpointing on a GPU) and
back-propagates in micro-batches of at most ``micro_batch`` candidates (GRPO: a group's candidates
at one trained step; each is two UNet rows under guidance) or pair x noise draws (DPO: a pair's draws
stay together, since its loss is a function of their mean; each is two UNet rows, winner and loser),
accumulating the gradients: the gradient is the whole batch's (each micro-batch's loss is weighed by
its share), so one update of any group size or number of pairs fits, in time linear in its size.

Half precision: in an fp16 model the gradients reaching the fp32 adapters pass through fp16
activations, and small ones underflow to zero (on the embedded model, with GRPO's loss shrunk to the
size a 768 px latent gives, 5% of the adapter gradients came out zero and the median one 21% off; 4.8%
with the scale, fp16's rounding). So in fp16
the loss is scaled before backward and the gradients unscaled after (``LossScale``: from 2^16,
halved and the same optimizer step recomputed when a scaled gradient overflows, as
``torch.amp.GradScaler`` does but without skipping steps). bf16 has fp32's exponent range: its
scale, like fp32's, is 1.

Guards, each with a plain report:

- a non-finite loss or gradient: no step is taken, nothing is saved, the previous weights stay;
- a trust region: the KL of the step kernels on the groups' own stored chains from the previous
  version's may not exceed ``kl_budget``. It watches each group's trained steps and, on the first
  ``kl_groups`` groups (the experts' come before the AI groups), the untrained ones too: the adapters act
  on all of them, and the late steps' small std makes their KL the largest. The previous version's
  kernels are taken once (the first step's groups' come with that step); the KL is measured before every
  optimizer step on that step's groups (for GRPO the trained steps' comes free with the forward pass,
  the others' costs a forward pass without gradients) and once on every group after the last: the update
  stops at the last step within the budget and keeps it, and is refused only when its first step
  already crosses it.

The reference policy's kernel means do not change during an update, so GRPO computes each once.
Each update starts a fresh optimizer: a version is its adapter weights and nothing else.
"""

from __future__ import annotations

import math
import secrets
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch

from data.modalities import prompt_modality
from optim.logprob import gaussian_kl
from optim.policy import Policy
from optim.preference.dpo import DPOConfig, NoiseDraws, dpo_terms, implicit_accuracy
from optim.preference.groups import RankedGroup
from optim.preference.grpo import (GRPOConfig, group_advantages, grpo_pass, grpo_step, micro_batches,
                                   reference_kernel_mean, step_weigher)
from optim.trajectory import Condition
from optim.versions import Version, VersionStore

ALGORITHMS = ("grpo", "dpo")
FP16_LOSS_SCALE = 2.0**16  # torch.amp.GradScaler's initial scale
NO_PAIRS = "no ranked pairs to learn from: every ranking is a single tier of ties"


@dataclass
class UpdateConfig:
    algorithm: str = "grpo"
    learning_rate: float = 1e-3  # the README's sweep: 3e-4 moved the images about a tenth as far
    epochs: int = 8  # passes over the update's groups; the trust region may stop the update earlier
    groups_per_step: int = 5  # groups per optimizer step (0: all of them, one step a pass)
    min_steps_per_pass: int = 2  # and at least this many steps a pass (5 human groups: 3 + 2)
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    kl_budget: float = 0.05  # largest mean step-kernel KL from the previous version (updates measured 1e-3 to 2e-2)
    train_fraction: float = 0.3  # share of each chain's denoising steps trained (at least one): 6 of 20
    train_window: str = "early"  # "early" (the first, noisiest steps), "random" (drawn per update) or "mixed" (both)
    # The trust region watches the trained steps of every group (for GRPO free with the training pass) and the
    # untrained steps of the first this many (the experts' come before AI groups): a forward pass each, and an
    # amplified update of 13 groups once spent a quarter of its 190 s of training in them when all were watched.
    kl_groups: int = 8
    # Most candidates (GRPO) or pair x noise draws (DPO) per backward; 0: all at once. Each is two UNet
    # rows; on an H100 with checkpointing a row at 768 px (SD 2.1-sized, bf16) took about 0.4 GiB, so 8
    # keeps an update near 9 GiB in bf16 and under 20 GiB in fp32, whatever the number of groups.
    micro_batch: int = 8
    seed: int | None = None  # trained steps and DPO's timesteps and noise; None: a fresh seed per update
    # GRPO: each modality's expert-ranked groups weigh alike in all, whatever their number (``modality_balance``);
    # False: each group weighs its experts' levels alone
    balance_modalities: bool = True
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


# (group index, step, first row of the micro-batch) -> (kernel mean of those candidates, std)
Kernels = dict[tuple[int, int, int], tuple[torch.Tensor, float]]


WINDOWS = ("early", "random", "mixed")


def trained_steps(groups: list[RankedGroup], fraction: float, generator: torch.Generator,
                  window: str = "early") -> list[list[int]]:
    """For each group, the stored steps this update trains, among the steps that carry a log-probability (a
    deterministic last step never is one): ``fraction`` of them (at least one), the first ones
    (``window="early"``) or a random draw (``"random"``); ``"mixed"`` trains the first ones and half as many
    again drawn at random from the later steps."""
    if not 0 < fraction <= 1:
        raise ValueError(f"train_fraction must be in (0, 1], got {fraction}")
    if window not in WINDOWS:
        raise ValueError(f"train_window must be one of {', '.join(WINDOWS)}, got {window!r}")
    plan = []
    for group in groups:
        scored = group.trajectory.scored_steps()
        count = max(1, round(fraction * len(scored)))
        if window == "random":
            chosen = torch.randperm(len(scored), generator=generator)[:count].tolist()
        else:
            chosen = list(range(count))
            if window == "mixed":  # and half as many of the later steps, drawn afresh
                chosen += (count + torch.randperm(len(scored) - count, generator=generator)[:count // 2]).tolist()
        plan.append(sorted(scored[i] for i in chosen))
    return plan


def step_batches(groups: list[int], groups_per_step: int, epochs: int, generator: torch.Generator,
                 min_steps: int = 1) -> list[list[int]]:
    """The groups (indices) each optimizer step trains: ``epochs`` passes over ``groups``, each in a fresh
    random order dealt into ceil(len / ``groups_per_step``) minibatches of near-equal size, and at least
    ``min_steps`` of them while there are groups enough (``groups_per_step`` 0: one a pass, whatever ``min_steps``)."""
    if epochs < 1 or groups_per_step < 0 or min_steps < 1:
        raise ValueError(f"an update needs at least one epoch, groups_per_step >= 0 and min_steps_per_pass >= 1, "
                         f"got {epochs}, {groups_per_step} and {min_steps}")
    per_pass = (min(len(groups), max(min_steps, math.ceil(len(groups) / groups_per_step))) if groups_per_step
                else min(1, len(groups)))
    batches = []
    for _ in range(epochs):
        order = [groups[i] for i in torch.randperm(len(groups), generator=generator).tolist()]
        batches += [sorted(order[k::per_pass]) for k in range(per_pass)]
    return batches


def only(steps: list[list[int]], batch: list[int]) -> list[list[int]]:
    """Each group's steps where the group is in ``batch``, none elsewhere: a plan for one optimizer step."""
    return [s if i in batch else [] for i, s in enumerate(steps)]


def grpo_backward(policy: Policy, groups: list[RankedGroup], config: UpdateConfig, plan: list[list[int]] | None = None,
                  references: Kernels | None = None, kernels: Kernels | None = None, loss_scale: float = 1.0) -> dict:
    """One optimizer step's worth of GRPO gradients over the planned steps of every group; its metrics.

    ``references`` caches the reference policy's kernel means across optimizer steps; ``kernels``
    receives the current policy's kernel means, from which the trust region's KL comes for free.
    The gradients are ``loss_scale`` times the loss's (``LossScale``).
    """
    advantages = group_advantages([g.rewards() for g in groups], config.grpo)
    references = {} if references is None else references

    def run_step(group, trajectory, step, rows, advantage, weight, last):
        key = (group, step, rows.start)
        if key not in references:
            references[key] = reference_kernel_mean(policy, trajectory, step, rows)
        terms = grpo_step(policy, trajectory, step, advantage, config.grpo, reference_mean=references[key], rows=rows)
        check_finite(terms.loss, "GRPO loss")
        if torch.is_grad_enabled():
            (loss_scale * weight * terms.loss).backward()
        if kernels is not None:
            kernels[key] = (terms.mean, terms.std)
        return terms

    weights = [g.weight() for g in groups]
    if config.balance_modalities:
        weights = [w * b for w, b in zip(weights, modality_balance(groups))]
    return grpo_pass([g.trajectory for g in groups], advantages, run_step, weights, plan,
                     config.micro_batch, step_weigher(config.grpo, policy))


def modality_balance(groups: list[RankedGroup]) -> list[float]:
    """Each group's factor that gives every modality among the experts' groups (read from the prompt's prefix)
    the same share of them, ``human groups / (modalities * human groups of its modality)``: experts who rank four
    CTs for every brain MRI still teach the adapters, which act on every prompt, as much about MRIs as about CTs.
    AI-ranked groups keep factor 1: they are drawn only for modalities the reward model can rank, and balanced
    with the experts' they gave those modalities the MRIs' share (the README's sweep)."""
    modalities = [prompt_modality(g.trajectory.prompt) if g.ai is None else None for g in groups]
    counts = Counter(m for m in modalities if m is not None)
    humans = sum(counts.values())
    return [1.0 if m is None else humans / (len(counts) * counts[m]) for m in modalities]


def dpo_pairs(groups: list[RankedGroup]) -> tuple[torch.Tensor, torch.Tensor, Condition, torch.Tensor]:
    """Winners' and losers' clean latents, prompt conditioning and weights for every ranked pair."""
    winners, losers, embeds, weights = [], [], [], []
    for group in groups:
        final = group.trajectory.latents[:, -1]
        for winner, loser, weight in group.pairs():
            winners.append(final[winner])
            losers.append(final[loser])
            embeds.append(group.trajectory.condition())
            weights.append(weight)
    if not winners:
        raise UpdateRefused(NO_PAIRS)
    return torch.stack(winners), torch.stack(losers), Condition.cat(embeds), torch.tensor(weights)


def dpo_backward(policy: Policy, groups: list[RankedGroup], config: UpdateConfig, generator: torch.Generator,
                 loss_scale: float = 1.0) -> dict:
    """One optimizer step's worth of Diffusion-DPO gradients over every ranked pair, in micro-batches of
    whole pairs; its metrics. Every pair's (t, noise) is drawn first, so the micro-batches see one batch's."""
    winners, losers, embeds, weights = dpo_pairs(groups)
    drawn = NoiseDraws.draw(policy, len(winners), tuple(winners.shape[1:]), config.dpo.noise_draws, generator)
    pairs_at_once = max(1, config.micro_batch // config.dpo.noise_draws) if config.micro_batch else 0
    loss, margins = 0.0, []
    for rows in micro_batches(len(winners), pairs_at_once):
        terms = dpo_terms(policy, winners[rows], losers[rows], embeds[rows], weights[rows], config.dpo, drawn=drawn.pairs(rows))
        check_finite(terms.loss, "DPO loss")
        share = weights[rows].sum() / weights.sum()  # each micro-batch's loss is its pairs' weighted mean
        if torch.is_grad_enabled():
            (loss_scale * share * terms.loss).backward()
        loss += float(share * terms.loss.detach())
        margins.append(terms.margin)
    margin = torch.cat(margins)
    return {"loss": loss, "implicit_accuracy": implicit_accuracy(margin), "margin_mean": float(margin.mean()),
            "pairs": int(margin.numel())}


class LossScale:
    """The loss scale of an update's backward passes: 2^16 in an fp16 model, 1 otherwise (see the module's
    docstring). ``backward`` runs a backward pass at the current scale, recomputes it at half the scale
    while a scaled gradient overflows, and leaves the unscaled gradients on the parameters."""

    def __init__(self, dtype: torch.dtype):
        self.value = FP16_LOSS_SCALE if dtype == torch.float16 else 1.0

    def backward(self, run, parameters: list[torch.nn.Parameter]) -> dict:
        """``run(scale)`` accumulates ``scale`` times the gradients and returns its metrics; they are returned."""
        while True:
            metrics = run(self.value)
            grads = [p.grad for p in parameters if p.grad is not None]
            if self.value <= 1.0 or all(torch.isfinite(g).all() for g in grads):
                break
            self.value /= 2  # an fp16 gradient overflowed: the same step again at half the scale
            for p in parameters:
                p.grad = None
        if self.value != 1.0:
            for g in grads:
                g.div_(self.value)
        return metrics


def check_finite(value: torch.Tensor, what: str) -> None:
    value = value.detach()
    if not torch.isfinite(value).all():
        raise UpdateRefused(f"the {what} is not finite ({float(value.flatten()[0])}): no step was taken")


@torch.no_grad()
def step_kernels(policy: Policy, groups: list[RankedGroup], plan: list[list[int]] | None = None,
                 micro_batch: int = 0) -> Kernels:
    """(mean, std) of the planned stored steps' kernels (all steps by default) under the current weights,
    ``micro_batch`` candidates at a time (keyed as ``grpo_backward`` keys them)."""
    plan = plan if plan is not None else [g.trajectory.scored_steps() for g in groups]
    return {(i, j, rows.start): policy.score_step(g.trajectory, j, rows)[1:]
            for i, (g, steps) in enumerate(zip(groups, plan)) for j in steps
            for rows in micro_batches(g.trajectory.latents.shape[0], micro_batch)}


def kl_between(before: Kernels, after: Kernels) -> float:
    """Mean step-kernel KL of ``after`` from ``before`` over the candidates and steps ``after`` holds (``before``
    holds them too; the two share their std)."""
    return float(torch.cat([gaussian_kl(mean, before[key][0], std) for key, (mean, std) in after.items()]).mean())


def apply_update(policy: Policy, store: VersionStore, groups: list[RankedGroup], config: UpdateConfig = UpdateConfig(),
                 on_step=None, accept=None, extra_metrics: dict | None = None) -> UpdateResult:
    """Train the adapters on ``groups`` and save a new version, or refuse and keep the current one.

    ``on_step(done, total)`` is told after each optimizer step (the page's progress bar). ``accept()``,
    when given, is asked about the trained weights before they are saved: a string it returns is the
    reason to refuse them (the control room checks the selector's pass rate). ``extra_metrics`` join
    the version's metrics.
    """
    if config.algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}, got {config.algorithm!r}")
    unranked = [g.id for g in groups if not g.rankings and g.ai is None]
    if not groups or unranked:
        raise ValueError(f"nothing to learn from: groups without a ranking: {', '.join(unranked)}" if unranked
                         else "nothing to learn from: no ranked groups were given")
    started = time.perf_counter()
    seed = config.seed if config.seed is not None else secrets.randbits(31)
    generator = torch.Generator().manual_seed(seed)
    grpo = config.algorithm == "grpo"
    plan = trained_steps(groups, config.train_fraction, generator, config.train_window)
    # DPO learns from pairs: a group that is one tier of ties has none, so no step is spent on it.
    trainable = [i for i, g in enumerate(groups) if grpo or g.pairs()]
    batches = step_batches(trainable, config.groups_per_step, config.epochs, generator, config.min_steps_per_pass)
    # The trust region watches each group's trained steps and the untrained steps of the first kl_groups.
    untrained = [[j for j in g.trajectory.scored_steps() if j not in steps] if i < config.kl_groups else []
                 for i, (g, steps) in enumerate(zip(groups, plan))]
    watched = [t + u for t, u in zip(plan, untrained)]
    previous = policy.lora_state_dict()
    parameters = policy.lora_parameters()
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    references: Kernels = {}
    scale = LossScale(policy.dtype)
    history, stopped = [], None
    last_good, kl_good, taken = previous, 0.0, 0  # the last weights known to be within the budget
    try:
        if not batches:
            raise UpdateRefused(NO_PAIRS)
        # The previous version's kernels: the first step's groups' come with that step, the others' take a pass now.
        others = [i for i in range(len(groups)) if i not in batches[0]]
        before = step_kernels(policy, groups, only(watched, others), config.micro_batch)
        with policy.training():  # gradient checkpointing on a GPU
            for k, batch in enumerate(batches):
                optimizer.zero_grad(set_to_none=True)
                if grpo:
                    kernels: Kernels = {}
                    metrics = scale.backward(lambda s: grpo_backward(policy, groups, config, only(plan, batch), references,
                                                                     kernels, s), parameters)
                    kernels.update(step_kernels(policy, groups, only(untrained, batch), config.micro_batch))
                else:
                    kernels = step_kernels(policy, groups, only(watched, batch), config.micro_batch)
                    draws = generator.get_state()  # a loss-scale retry redoes this step with the same (t, noise)
                    metrics = scale.backward(lambda s: dpo_backward(policy, [groups[i] for i in batch], config,
                                                                    generator.set_state(draws), s), parameters)
                if k == 0:
                    before.update(kernels)
                kl = kl_between(before, kernels)  # of the weights this step starts from, on its groups
                if not math.isfinite(kl) or kl > config.kl_budget:
                    stopped = kl
                    break
                last_good, kl_good, taken = (policy.lora_state_dict() if k else previous), kl, k
                grad_norm = torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
                check_finite(grad_norm, "gradient norm")
                optimizer.step()
                history.append({**metrics, "groups": len(batch), "grad_norm": float(grad_norm), "kl_before_step": kl,
                                "loss_scale": scale.value})
                if on_step is not None:
                    on_step(k + 1, len(batches))
        if stopped is None:
            kl = kl_between(before, step_kernels(policy, groups, watched, config.micro_batch))
            if not math.isfinite(kl) or kl > config.kl_budget:
                stopped = kl
            else:
                kl_good, taken = kl, len(history)
        if stopped is not None:
            if taken == 0:
                raise UpdateRefused(
                    f"the update moved the model too far: KL {stopped:.4g} from the current version after one step is over "
                    f"the budget {config.kl_budget:g}; lower the learning rate"
                )
            policy.load_lora_state_dict(last_good)
            history = history[:taken]
        kl = kl_good
        reason = accept() if accept is not None else None
        if reason:
            raise UpdateRefused(reason)
    except UpdateRefused as refusal:
        policy.load_lora_state_dict(previous)
        kept = policy.version or "the base model"
        return UpdateResult(False, None, {**(extra_metrics or {}), "steps": history, "seed": seed},
                            f"update refused: {refusal}; {kept} stays current")
    except BaseException:  # out of memory, interrupted ...: the weights go back before the error goes on
        policy.load_lora_state_dict(previous)
        raise
    sources = [g.source for g in groups]
    summary = {
        **(extra_metrics or {}),
        "algorithm": config.algorithm,
        "groups": [g.id for g in groups],
        "human_groups": sources.count("human"),
        "ai_groups": sources.count("ai"),
        "loss_first": history[0]["loss"],
        "loss_last": history[-1]["loss"],
        "kl_from_previous": kl,
        "optimizer_steps_taken": len(history),
        "optimizer_steps_planned": len(batches),
        "stopped_by_kl_budget": stopped is not None,
        "seed": seed,
        "trained_steps": plan,
        "wall_time_s": time.perf_counter() - started,
        "steps": history,
        "config": asdict(config),
    }
    parent = policy.version
    version = policy.save_version(store, algorithm=config.algorithm, metrics=summary)
    ai = f" ({summary['ai_groups']} ranked by the reward model)" if summary["ai_groups"] else ""
    message = (f"{version.id} made from {parent or 'the base model'} by {config.algorithm.upper()} on {len(groups)} group(s){ai}: "
               f"loss {summary['loss_first']:.4g} -> {summary['loss_last']:.4g}, KL {kl:.3g}")
    if stopped is not None:
        message += (f"; stopped after {len(history)} of {len(batches)} steps: the next would cross the KL budget "
                    f"{config.kl_budget:g}")
    return UpdateResult(True, version, summary, message)
