"""AI feedback for amplified updates: the reward model learned from the experts ranks extra groups.

Experts rank a few dozen groups; an update that trains only on those moves the generator little.
An amplified update (classic RLHF, REFERENCES.md section 8) first fits the reward model
(``optim.preference.reward_model``) on every stored human ranking and imported rating, then has the rejection
sampler draw extra groups for the prompts the experts ranked (and any queued prompts), and lets the
reward model rank them. The trainers then see human and AI groups together:

- an AI group's rewards are the reward model's scores (dense: GRPO normalises them within the group),
  its DPO pairs follow the scores, and its loss weight is ``ai_weight`` against the experts' levels 1-3;
- an AI group on which the ensemble's members disagree (agreement below ``min_agreement``) is skipped,
  and an update where more than ``max_disagreeing_share`` of the AI groups are skipped is refused:
  the reward model is not sure enough of what the experts want to stand in for them;
- AI groups are stored with ``source = "ai"`` and the model's scores, never offered to experts and
  never exported as human preferences.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from PIL import Image

from data.store import Store
from optim.preference.reward_model import (RewardModel, RewardModelConfig, comparisons_from_rankings,
                                           comparisons_from_ratings, ensemble_agreement)
from workbench.sampler import RejectionSampler, SamplerResult


@dataclass
class AmplifyConfig:
    ai_groups: int = 0  # AI-ranked groups an update adds: the admin chooses per update on the Optimize tab (README: 4)
    ai_weight: float = 1.0  # an AI group's loss weight; an expert's ranking weighs its level, 1-3
    min_agreement: float = 0.8  # AI groups whose ensemble agreement is below this are skipped
    max_disagreeing_share: float = 0.5  # more AI groups skipped than this share: the update is refused
    min_ranked_groups: int = 4  # the reward model is fitted only on at least this many ranked groups
    reward_model: RewardModelConfig = field(default_factory=RewardModelConfig)


@dataclass
class AIGroup:
    draw: SamplerResult  # the survivors, their chains, and the sampler's verdicts
    seed: int
    scores: list[float]  # the reward model's ensemble mean per survivor
    agreement: float


class AmplificationRefused(Exception):
    """The reward model cannot stand in for the experts here; the message says why."""


def fit_reward_model(store: Store, features, config: AmplifyConfig) -> RewardModel | None:
    """The reward model on every stored human ranking and imported rating; None with too few ranked groups.

    ``features`` is the featurizer (``optim.preference.reward_model.featurizer``). The model's ``seen`` says which
    rankings and imported ratings it learned from.
    """
    images, comparisons, seen = [], [], {"rankings": [], "imported_ratings": []}
    ranked = store.groups_with_rankings()  # a fixed number of queries, however many groups
    if len(ranked) < config.min_ranked_groups:
        return None
    for group in ranked:
        survivors, rows = group["passed_candidates"], group["rankings"]
        comparisons += comparisons_from_rankings(group["id"], len(images), [c["id"] for c in survivors],
                                                 [(r["tiers"], r["level"]) for r in rows])
        images += [_image(store, c["image"]) for c in survivors]
        seen["rankings"] += [r["id"] for r in rows]
    imported = store.imported_ratings()
    comparisons += comparisons_from_ratings(
        {"prompt": row["prompt"], "rating": row["rating"], "level": row["level"], "index": len(images) + k}
        for k, row in enumerate(imported))
    images += [_image(store, row["image"]) for row in imported]
    seen["imported_ratings"] = [row["id"] for row in imported]
    if not comparisons:
        return None
    model = RewardModel.fit(images, comparisons, features, config.reward_model)
    model.seen = seen
    return model


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
            agreement = ensemble_agreement(rewards)
            if agreement >= config.min_agreement:
                kept.append(AIGroup(draw, group_seed, rewards.mean(dim=1).tolist(), agreement))
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
