"""Experts' rankings and ratings turned into what the trainers consume: rewards, pairs and weights.

A ranking is a list of tiers, best first; a tier is a list of candidate ids (strings or integers)
that the expert could not tell apart, e.g. ``[["c2"], ["c0", "c3"], ["c1"]]`` (``data.rankings``
checks it: ``validate_ranking``). GRPO wants one reward per candidate, Diffusion-DPO wants (winner,
loser) pairs; both come from the same ranking.

Conventions, and why:

- A ranking must cover exactly its group's candidates when they are given (``data.rankings``).
- Rewards are linear in position, best 1.0, worst 0.0; tied candidates share the mean of the
  positions they occupy. A lone candidate, like a single tier of ties, gets 0.5: no information.
- Tied candidates give no pair (as in ImageReward): a tie is not a preference, and training on it
  as "first one wins" teaches noise.
- Expert level (1-3) is a loss WEIGHT equal to the level, never a change of label. Losses divide
  by the sum of weights, so only the ratio counts: a level-3 expert counts three level-1 experts.
"""

from __future__ import annotations

import math
import numbers
from typing import Iterable, Sequence

from data.experts import LEVELS
from data.rankings import CandidateId, Ranking, RankingError, Tiers, validate_ranking  # noqa: F401 (public here too)
from data.ratings import RatingsConfig


def position_rewards(tiers: Ranking) -> dict[CandidateId, float]:
    """Each candidate's reward, best first: position p of 0..N-1 gives 1 - p / (N - 1); ties share their mean p.

    ``[[a], [b, c], [d]]`` gives a 1.0, b and c 0.5 (mean of positions 1 and 2 of 0..3), d 0.0;
    ``[[a, b], [c]]`` gives a and b 0.75 (mean position 0.5 of 0..2), c 0.0.
    """
    tiers = validate_ranking(tiers)
    last = sum(len(tier) for tier in tiers) - 1
    rewards, start = {}, 0
    for tier in tiers:
        mean_position = start + (len(tier) - 1) / 2
        for candidate in tier:
            rewards[candidate] = 1.0 - mean_position / last if last else 0.5  # a lone candidate: no information
        start += len(tier)
    return rewards


def rating_reward(rating: float, low: float = 1, high: float = 3) -> float:
    """A rating on the scale ``low..high`` as a reward in [0, 1]: (rating - low) / (high - low)."""
    if not high > low:
        raise ValueError(f"the rating scale {low:g}-{high:g} is empty: high must be above low")
    if not isinstance(rating, numbers.Real) or not math.isfinite(rating):
        raise ValueError(f"rating {rating!r} is not a finite number (the scale is {low:g}-{high:g})")
    if not low <= rating <= high:
        raise ValueError(f"rating {rating:g} is outside the scale {low:g}-{high:g}")
    return RatingsConfig(low, high).normalise(rating)


def ranked_pairs(tiers: Ranking) -> list[tuple[CandidateId, CandidateId]]:
    """Every (winner, loser) with the winner in a better tier; ties give none.

    Ordered by the winner's place in the ranking, then the loser's: ``[[a], [b, c], [d]]`` gives
    (a, b), (a, c), (a, d), (b, d), (c, d).
    """
    tiers = validate_ranking(tiers)
    return [
        (winner, loser)
        for number, tier in enumerate(tiers)
        for winner in tier
        for worse in tiers[number + 1:]
        for loser in worse
    ]


def level_weight(level: int) -> float:
    """An expert level (1, 2 or 3) as its loss weight: the level itself (see the module's conventions)."""
    if level not in LEVELS:  # 2.0 is 2; 2.5, NaN and "2" are none of them
        raise ValueError(f"expert level {level!r} is not 1, 2 or 3")
    return float(level)


def level_weighted_mean(values: Iterable[tuple[float, int]]) -> float:
    """``(value, expert level)`` pairs as one number: their mean, each weighed by ``level_weight``.

    How several experts' numbers for one thing become one: position rewards of a candidate
    (``combined_rewards``), ratings of an image (``optim.train_data.RatingsPairs``).
    """
    total = weights = 0.0
    for value, level in values:
        weight = level_weight(level)
        total += weight * value
        weights += weight
    return total / weights


def combined_rewards(rankings: Sequence[tuple[Ranking, int]]) -> dict[CandidateId, float]:
    """Several experts' (ranking, level) of one group as one reward per candidate.

    Each reward is the level-weighted mean of the position rewards, over the rankings that cover
    that candidate. Candidates come in the order they first appear; no rankings give no rewards.
    """
    rewards: dict[CandidateId, list[tuple[float, int]]] = {}
    for tiers, level in rankings:
        for candidate, reward in position_rewards(tiers).items():
            rewards.setdefault(candidate, []).append((reward, level))
    return {candidate: level_weighted_mean(given) for candidate, given in rewards.items()}


def weighted_pairs(rankings: Sequence[tuple[Ranking, int]]) -> list[tuple[CandidateId, CandidateId, float]]:
    """Every expert's pairs as (winner, loser, weight), expert by expert, in ``ranked_pairs`` order.

    A pair two experts both give appears twice, once with each weight: in a loss that divides by
    the sum of weights that equals one pair with the summed weight, and each row stays one expert's
    judgement. Contradictory pairs from two experts are both kept, so the loss weighs the disagreement.
    """
    pairs = []
    for tiers, level in rankings:
        weight = level_weight(level)  # checked even when the ranking, all ties, gives no pair
        pairs += [(winner, loser, weight) for winner, loser in ranked_pairs(tiers)]
    return pairs
