"""AI feedback for amplified updates: the reward model learned from the experts ranks extra groups.

Experts rank a few dozen groups; an update that trains only on those moves the generator little.
An amplified update (classic RLHF, REFERENCES.md section 8) first fits the reward model
(``optim.preference.reward_model``) on every stored human ranking and imported rating, then has the rejection
sampler draw extra groups for the prompts the experts ranked (and any queued prompts), and lets the
reward model rank them. The trainers then see human and AI groups together:

- the AI groups go to the ranked prompts trained on least so far (``prompts_for_ai_groups``), not only to
  the prompts of this update: experts rank what they are offered, often one modality far more than
  another (on the learning benchmark 5 brain MRI groups of 30 beside 18 abdominal CT), and the reward
  model, learned from every ranking, can stand in for them where they ranked little;
- an AI group's rewards are the reward model's scores (dense: GRPO normalises them within the group),
  its DPO pairs follow the scores, and its loss weight is ``ai_weight`` against the experts' levels 1-3;
  candidates the model cannot tell apart (a Bradley-Terry win probability below ``tie_probability``)
  share a tier, with their tier's mean score and no pair between them, as an expert ties them;
- AI groups are drawn only for prompts of a modality on which the reward model has shown, on groups it
  did not see, that it orders pairs as the experts do better than a coin would (the 95% Wilson interval
  of its held-out accuracy on that modality above ``min_modality_accuracy``; ``prompts_the_model_can_rank``).
  Bootstrap members trained on the same few groups share their blind spots, so their agreement cannot
  catch this: on the learning benchmark the contrast expert hardly tells brain MRIs apart (their
  contrast varies a quarter as much as a CT's), the model ordered 8 of 12 held-out MRI pairs right
  (95% 39%-86%) beside 96% of CT pairs, and its members agreed 0.83-0.97 on the MRI groups it ranked.
  Barely better than a coin is not enough: GRPO normalises each group's rewards, so a model right 55% of
  the time pushes as hard as one right 99% of the time, and what it orders by among the expert's ties is
  whatever else it learned. With the interval's low end at 55% (16 of 21 MRI pairs), one update's three
  MRI AI groups moved the contrast expert's MRIs down by ten times its tie where no update before had
  moved them by more than the tie; hence the low end must clear 60%;
- an AI group on which the ensemble's members disagree (agreement below ``min_agreement``) is skipped,
  and an update where more than ``max_disagreeing_share`` of the AI groups are skipped is refused:
  the reward model is not sure enough of what the experts want to stand in for them;
- AI groups are stored with ``source = "ai"`` and the model's scores, never offered to experts and
  never exported as human preferences.
"""

from __future__ import annotations

import io
import math
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from PIL import Image

from data.modalities import prompt_modality
from data.store import Store
from optim.preference.reward_model import (RewardModel, RewardModelConfig, comparisons_from_rankings,
                                           comparisons_from_ratings, confident_tiers, ensemble_agreement, fit_best)
from workbench.sampler import RejectionSampler, SamplerResult


@dataclass
class AmplifyConfig:
    ai_groups: int = 0  # AI-ranked groups an update adds: the admin chooses per update on the Optimize tab (README: 4)
    ai_weight: float = 1.0  # an AI group's loss weight; an expert's ranking weighs its level, 1-3
    min_agreement: float = 0.8  # AI groups whose ensemble agreement is below this are skipped
    # candidates whose Bradley-Terry win probability under the model is below this share a tier, as an expert's
    # ties do (0.5: only equal scores)
    tie_probability: float = 0.5
    max_disagreeing_share: float = 0.5  # more AI groups skipped than this share: the update is refused
    min_ranked_groups: int = 4  # the reward model is fitted only on at least this many ranked groups
    # AI groups only for modalities whose held-out accuracy's 95% interval lies above this (0.5: better than
    # chance; 0: no check, every ranked prompt; see the module's notes for why 0.6)
    min_modality_accuracy: float = 0.6
    reward_model: RewardModelConfig = field(default_factory=RewardModelConfig)


@dataclass
class AIGroup:
    draw: SamplerResult  # the survivors, their chains, and the sampler's verdicts
    seed: int
    scores: list[float]  # the reward model's ensemble mean per survivor
    agreement: float
    tiers: list[list[int]]  # survivors' rows best first, near-ties sharing a tier (``confident_tiers``)


class AmplificationRefused(Exception):
    """The reward model cannot stand in for the experts here; the message says why."""


def fit_reward_model(store: Store, featurizers: list, config: AmplifyConfig) -> RewardModel | None:
    """The reward model on every stored human ranking and imported rating; None with too few ranked groups.

    ``featurizers`` are those ``config.reward_model.feature_choices()`` names
    (``optim.preference.reward_model.featurizer``); with several, the one the held-out groups favour is kept
    (``fit_best``). The model's ``seen`` says which rankings and imported ratings it learned from.
    """
    images, comparisons, seen, modality_of = [], [], {"rankings": [], "imported_ratings": []}, {}
    ranked = store.groups_with_rankings()  # a fixed number of queries, however many groups
    if len(ranked) < config.min_ranked_groups:
        return None
    for group in ranked:
        survivors, rows = group["passed_candidates"], group["rankings"]
        comparisons += comparisons_from_rankings(group["id"], len(images), [c["id"] for c in survivors],
                                                 [(r["tiers"], r["level"]) for r in rows])
        images += [_image(store, c["image"]) for c in survivors]
        seen["rankings"] += [r["id"] for r in rows]
        modality_of[group["id"]] = prompt_modality(group["prompt"])
    imported = store.imported_ratings()
    comparisons += comparisons_from_ratings(
        {"prompt": row["prompt"], "rating": row["rating"], "level": row["level"], "index": len(images) + k}
        for k, row in enumerate(imported))
    images += [_image(store, row["image"]) for row in imported]
    modality_of.update({row["prompt"]: prompt_modality(row["prompt"]) for row in imported})  # their pairs' group
    seen["imported_ratings"] = [row["id"] for row in imported]
    if not comparisons:
        return None
    model = fit_best(images, comparisons, featurizers, config.reward_model, modality_of=modality_of)
    model.seen = seen
    return model


def prompts_the_model_can_rank(prompts: list[str], heldout_by_modality: dict[str, dict], min_accuracy: float
                               ) -> tuple[list[str], dict[str, str]]:
    """The prompts whose modality the reward model orders better than ``min_accuracy`` on held-out groups (the
    lower end of the 95% interval, ``RewardModel.metrics["heldout_by_modality"]``), and for each modality left
    out a line that names it and says why. A modality without held-out pairs is left out (nothing shows the
    model knows it); ``min_accuracy`` 0 keeps every prompt."""
    if min_accuracy <= 0:
        return list(prompts), {}
    kept, left_out = [], {}
    for prompt in prompts:
        modality = prompt_modality(prompt)
        figures = heldout_by_modality.get(modality)
        if figures is not None and figures["low"] > min_accuracy:
            kept.append(prompt)
        elif figures is None:
            left_out[modality] = f"{modality}: no held-out pairs of its prompts to check the reward model on"
        else:
            low = math.floor(figures["low"] * 100 + 1e-9)  # rounded down: 0.5997 reads 59%, not "60%, not above 60%"
            left_out[modality] = (f"{modality}: the reward model ordered {figures['accuracy']:.0%} of its "
                                  f"{figures['pairs']} held-out pairs as the experts did (95% interval "
                                  f"{low}%-{figures['high']:.0%}, not above {min_accuracy:.0%})")
    return kept, left_out


def prompts_for_ai_groups(update_prompts: list[str], queued: list[str], trained: dict[str, int]) -> list[str]:
    """The prompts to draw AI groups for, in turn: every ranked or queued prompt, fewest trained groups first.

    ``update_prompts`` are this update's human groups' prompts (one per group), ``queued`` the prompt queue's,
    ``trained`` every ranked prompt with the number of its groups earlier updates trained on
    (``Store.ranked_prompts_trained``). A prompt's count includes this update's groups of it. Equal counts
    keep this order: this update's prompts, the queue's, then those ranked earlier.
    """
    this_update = Counter(update_prompts)
    candidates = dict.fromkeys(update_prompts + queued + list(trained))
    return sorted(candidates, key=lambda prompt: trained.get(prompt, 0) + this_update[prompt])


def draw_ai_groups(sampler: RejectionSampler, model: RewardModel, prompts: list[str], config: AmplifyConfig,
                   sampling: dict, seed: int, on_group: Callable[[int, int], None] | None = None
                   ) -> tuple[list[AIGroup], int]:
    """``config.ai_groups`` groups drawn round the prompts and ranked by ``model``; and how many were skipped.

    The groups' seeds come from ``seed`` (the update's), so an update is reproducible.

    Raises ``AmplificationRefused`` when the ensemble disagrees on more than the allowed share.
    """
    if not prompts:
        raise AmplificationRefused("no prompts to draw AI-ranked groups for: rank a group first")
    kept, skipped = [], 0
    seeds = random.Random(seed)
    for k in range(config.ai_groups):
        group_seed = seeds.getrandbits(31)
        draw = sampler.draw(prompts[k % len(prompts)], group_seed, **sampling)
        if len(draw.survivors) >= 2:
            rewards = model.member_rewards([c.image for c in draw.survivors])  # features computed once
            agreement, scores = ensemble_agreement(rewards), rewards.mean(dim=1).tolist()
            if agreement >= config.min_agreement:
                kept.append(AIGroup(draw, group_seed, scores, agreement, confident_tiers(scores, config.tie_probability)))
            else:
                skipped += 1
        if on_group is not None:
            on_group(k + 1, config.ai_groups)
    if config.ai_groups and skipped > config.max_disagreeing_share * config.ai_groups:
        raise AmplificationRefused(
            f"the reward model's ensemble disagrees on {skipped} of {config.ai_groups} AI-ranked groups (agreement "
            f"below {config.min_agreement:.2f}): rank more groups by hand, or ask for fewer AI groups")
    return kept, skipped


def _image(store: Store, digest: str) -> Image.Image:
    return Image.open(io.BytesIO(store.blobs.get(digest))).convert("RGB")
