"""Rejection sampling: draw candidates in batches until enough pass the selector, or the budget is spent.

The earlier workbench's sampler appended the right answer to its candidates, so it always passed.
Here a candidate reaches the expert only on the selector's verdict, which sees the image and the
prompt and nothing else; nothing is ever added to make up the number. At the budget the sampler
returns the survivors it has (possibly none) and says so plainly.

Unless the survivors are exactly one draw as it was drawn, their chains are joined and re-scored once
as one batch, so that GRPO's ratio, which re-scores the group in that layout, is exactly 1 before any
update (matrix products give last-bit differences across batch layouts).

Candidate seeds come from one stream per group seed (``optim.policy.candidate_seeds``), taken in
order batch after batch, so the first batch is exactly ``policy.sample(prompt, n=batch, seed=seed)``
and a group is reproducible from its seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from PIL import Image

from optim.policy import Policy, candidate_seeds
from optim.trajectory import Trajectory
from optim.selector.model import Selector, Verdict


@dataclass
class SamplerConfig:
    survivors: int = 4  # k: how many candidates the expert should rank
    batch_size: int = 4  # candidates per batched draw
    max_draws: int = 16  # the budget: candidates drawn at most per group


@dataclass
class Candidate:
    index: int  # order of drawing within the group, 0 first
    seed: int
    image: Image.Image
    verdict: Verdict


@dataclass
class SamplerResult:
    prompt: str
    wanted: int
    drawn: int
    passed: int  # every candidate that passed, including any beyond ``wanted`` that were not kept
    survivors: list[Candidate]
    rejected: list[Candidate]
    trajectory: Trajectory | None  # the survivors' chains, in the survivors' order; None if none survived

    @property
    def pass_rate(self) -> float:
        return self.passed / self.drawn if self.drawn else 0.0

    @property
    def complete(self) -> bool:
        return len(self.survivors) == self.wanted

    def message(self) -> str:
        """What happened, in one sentence for the page."""
        rate = f"pass rate {self.pass_rate:.0%}"
        if self.complete:
            return f"{self.wanted} of {self.wanted} candidates passed the selector ({self.drawn} drawn, {rate})"
        return (
            f"only {len(self.survivors)} of the {self.wanted} wanted candidates passed the selector: the budget of "
            f"{self.drawn} draws is spent ({rate}); the rejected candidates list their reasons"
        )


class RejectionSampler:
    def __init__(self, policy: Policy, selector: Selector, config: SamplerConfig | None = None):
        self.policy = policy
        self.selector = selector
        self.config = config or SamplerConfig()

    def draw(
        self,
        prompt: str,
        seed: int = 0,
        survivors: int | None = None,
        steps: int = 20,
        guidance: float = 5.0,
        eta: float = 1.0,
        on_batch: Callable[[int, int, int], None] | None = None,
    ) -> SamplerResult:
        """Draw until ``survivors`` (default ``config.survivors``) candidates pass or the budget is spent.

        ``on_batch(drawn, kept, budget)`` is called after each batch: the page's progress bar.
        """
        wanted = survivors if survivors is not None else self.config.survivors
        budget = self.config.max_draws
        if not 1 <= wanted <= budget:
            raise ValueError(f"survivors must be between 1 and the draw budget {budget}, got {wanted}")
        seeds = candidate_seeds(seed, budget)
        kept: list[Candidate] = []
        rejected: list[Candidate] = []
        chains: list[Trajectory] = []
        drawn = passed = 0
        whole_batch = False
        while len(kept) < wanted and drawn < budget:
            batch_seeds = seeds[drawn : drawn + min(self.config.batch_size, budget - drawn)]
            samples = self.policy.sample(prompt, seeds=batch_seeds, steps=steps, guidance=guidance, eta=eta)
            verdicts = self.selector.judge(samples.images, prompt=prompt)
            keep_rows = []
            for row, (image, verdict) in enumerate(zip(samples.images, verdicts)):
                candidate = Candidate(drawn + row, batch_seeds[row], image, verdict)
                if not verdict.passed:
                    rejected.append(candidate)
                    continue
                passed += 1
                if len(kept) < wanted:
                    kept.append(candidate)
                    keep_rows.append(row)
            if keep_rows:
                chains.append(samples.trajectory.select(keep_rows))
            whole_batch = len(chains) == 1 and len(keep_rows) == len(batch_seeds)  # survivors = one draw, as drawn
            drawn += len(batch_seeds)
            if on_batch is not None:
                on_batch(drawn, len(kept), budget)
        trajectory = Trajectory.join(chains) if chains else None
        if trajectory is not None and not whole_batch:
            # Re-scored as one batch: numerically a different layout from the draws, and the ratio
            # before any update must be exactly 1 when GRPO re-scores the group in this layout.
            trajectory.log_probs = self.policy.log_probs(trajectory)
        return SamplerResult(prompt, wanted, drawn, passed, kept, rejected, trajectory)
