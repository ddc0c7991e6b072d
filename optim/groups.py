"""A ranked group: the candidates drawn for one prompt, their stored chains, and the experts' rankings.

This is the unit both trainers consume. GRPO reads one reward per candidate (the level-weighted mean
of each expert's position rewards); Diffusion-DPO reads the (winner, loser, weight) pairs. Both
come from ``optim.rewards``, so the two algorithms always see the same preferences.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from optim.trajectory import Trajectory
from optim.rewards import Ranking, combined_rewards, validate_ranking, weighted_pairs


@dataclass
class RankedGroup:
    id: str
    candidate_ids: list[str]  # in the trajectory's row order
    trajectory: Trajectory
    rankings: list[tuple[Ranking, int]] = field(default_factory=list)  # (tiers best first, expert level)

    def __post_init__(self):
        if len(self.candidate_ids) != self.trajectory.latents.shape[0]:
            raise ValueError(
                f"group {self.id}: {len(self.candidate_ids)} candidate ids for {self.trajectory.latents.shape[0]} stored chains"
            )
        self.rankings = [(validate_ranking(tiers, self.candidate_ids), level) for tiers, level in self.rankings]

    def rewards(self) -> torch.Tensor:
        """One reward per candidate, in row order (0.5 for all when nobody ranked the group)."""
        rewards = combined_rewards(self.rankings)
        return torch.tensor([rewards.get(c, 0.5) for c in self.candidate_ids], dtype=torch.float32)

    def pairs(self) -> list[tuple[int, int, float]]:
        """(winner row, loser row, weight) for every ranked pair, ties skipped."""
        row = {c: i for i, c in enumerate(self.candidate_ids)}
        return [(row[w], row[l], weight) for w, l, weight in weighted_pairs(self.rankings)]
