"""A ranked group: the candidates drawn for one prompt, their stored chains, and the experts' rankings.

This is the unit both trainers consume. GRPO reads one reward per candidate (the level-weighted mean
of each expert's position rewards) and the group's weight; Diffusion-DPO reads the (winner, loser,
weight) pairs. Both come from ``optim.preference.rewards``, so the two algorithms always see the same preferences.

A group the reward model ranked instead of an expert (an amplified update's AI feedback) carries an
``AIRanking``: its rewards are the model's scores (dense, not positions), its pairs follow the scores,
and its weight is the configured AI weight, set against the experts' levels (1-3). Candidates the model
cannot tell apart share a tier (``reward_model.confident_tiers``), as in an expert's ranking: they get
their tier's mean score and make no pair, so a near-tie does not count, once GRPO has normalised the
group, as much as a clear difference.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from optim.trajectory import Trajectory
from optim.preference.rewards import Ranking, combined_rewards, level_weight, validate_ranking, weighted_pairs


@dataclass
class AIRanking:
    scores: list[float]  # the reward model's ensemble mean per candidate, in row order
    agreement: float  # share of the ensemble members' pair orderings that agree with the mean's
    weight: float  # the group's loss weight, against an expert level's 1-3
    tiers: list[list[int]]  # rows best first; rows in one tier the model could not tell apart

    def tier_scores(self) -> list[float]:
        """Each row's score, averaged over its tier: a tie's candidates are rewarded alike."""
        scores = list(self.scores)
        for tier in self.tiers:
            for row in tier:
                scores[row] = sum(self.scores[r] for r in tier) / len(tier)
        return scores


@dataclass
class RankedGroup:
    id: str
    candidate_ids: list[str]  # in the trajectory's row order
    trajectory: Trajectory
    rankings: list[tuple[Ranking, int]] = field(default_factory=list)  # (tiers best first, expert level)
    ai: AIRanking | None = None  # set when the reward model ranked the group

    @property
    def source(self) -> str:
        return "ai" if self.ai is not None else "human"

    def __post_init__(self):
        if len(self.candidate_ids) != self.trajectory.latents.shape[0]:
            raise ValueError(
                f"group {self.id}: {len(self.candidate_ids)} candidate ids for {self.trajectory.latents.shape[0]} stored chains"
            )
        self.rankings = [(validate_ranking(tiers, self.candidate_ids), level) for tiers, level in self.rankings]

    def weight(self) -> float:
        """The group's loss weight in GRPO: the sum of its rankings' expert levels, or the AI weight.

        A group ranked by a level-3 expert counts three times one ranked by a level-1 expert, as its
        pairs do in DPO; a group two experts ranked counts for both.
        """
        if self.ai is not None:
            return self.ai.weight
        return sum(level_weight(level) for _, level in self.rankings)

    def rewards(self) -> torch.Tensor:
        """One reward per candidate, in row order (0.5 for all when nobody ranked the group)."""
        if self.ai is not None:
            return torch.tensor(self.ai.tier_scores(), dtype=torch.float32)
        rewards = combined_rewards(self.rankings)
        return torch.tensor([rewards.get(c, 0.5) for c in self.candidate_ids], dtype=torch.float32)

    def pairs(self) -> list[tuple[int, int, float]]:
        """(winner row, loser row, weight) for every ranked pair, ties skipped."""
        if self.ai is not None:
            tiers = self.ai.tiers
            return [(w, l, self.ai.weight) for k, better in enumerate(tiers) for worse in tiers[k + 1:]
                    for w in better for l in worse]
        row = {c: i for i, c in enumerate(self.candidate_ids)}
        return [(row[w], row[l], weight) for w, l, weight in weighted_pairs(self.rankings)]
