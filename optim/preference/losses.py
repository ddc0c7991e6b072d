"""The numbers the page shows for one ranked group, before any update: GRPO and DPO side by side.

Per candidate: reward, advantage, log-prob ratio (exactly 1.0 while the policy is the one that drew
the group) and KL to the reference; per pair: DPO margin, implicit rewards and loss; and totals.
Nothing here changes a weight: everything runs without gradients. DPO's timesteps and noise come
from a fixed seed (``SHOWN_SEED``), so the same group shows the same numbers every time.
"""

from __future__ import annotations

import torch

from optim.preference.dpo import dpo_terms
from optim.preference.groups import RankedGroup
from optim.preference.grpo import group_advantages, grpo_step
from optim.policy import Policy
from optim.preference.update import UpdateConfig, dpo_pairs

SHOWN_SEED = 0


@torch.no_grad()
def group_losses(policy: Policy, group: RankedGroup, config: UpdateConfig = UpdateConfig()) -> dict:
    rewards = group.rewards()
    advantages = group_advantages([rewards], config.grpo)[0]
    steps = [grpo_step(policy, group.trajectory, j, advantages, config.grpo) for j in group.trajectory.scored_steps()]
    ratio = torch.stack([s.ratio for s in steps]).mean(dim=0)
    kl = torch.stack([s.kl for s in steps]).mean(dim=0)
    grpo = {
        "candidates": [
            {"id": c, "reward": float(rewards[i]), "advantage": float(advantages[i]),
             "ratio": float(ratio[i]), "kl": float(kl[i])}
            for i, c in enumerate(group.candidate_ids)
        ],
        "loss": float(torch.stack([s.loss for s in steps]).mean()),
        "kl": float(kl.mean()),
        "std_convention": f"sample std (ddof=1), scaled per {config.grpo.scale_rewards}",
    }
    pairs = group.pairs()
    if not pairs:
        return {"grpo": grpo, "dpo": {"pairs": [], "loss": None, "accuracy": None, "beta": config.dpo.beta}}
    terms = dpo_terms(policy, *dpo_pairs([group]), config.dpo, torch.Generator().manual_seed(SHOWN_SEED))
    dpo = {
        "pairs": [
            {"winner": group.candidate_ids[w], "loser": group.candidate_ids[l], "weight": weight,
             "margin": float(terms.margin[k]), "winner_reward": float(terms.winner_reward[k]),
             "loser_reward": float(terms.loser_reward[k]), "loss": float(terms.pair_loss[k])}
            for k, (w, l, weight) in enumerate(pairs)
        ],
        "loss": float(terms.loss),
        "accuracy": terms.accuracy,
        "beta": config.dpo.beta,
    }
    return {"grpo": grpo, "dpo": dpo}
