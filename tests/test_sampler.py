"""The rejection sampler on the embedded generator: keeps drawing, never pads, says when the budget ran out."""

import numpy as np
import pytest
import torch

from workbench.sampler import RejectionSampler, SamplerConfig
from optim.selector.model import Verdict
from tests.conftest import FAST, PROMPT


class ScriptedSelector:
    """Passes candidates by their draw order only (a test double); records what it was shown."""

    def __init__(self, passing: set[int]):
        self.passing = passing
        self.seen = 0
        self.shown_prompts = []

    def judge(self, images, prompt=None, modality=None):
        verdicts = []
        for _ in images:
            ok = self.seen in self.passing
            verdicts.append(Verdict(ok, 0.9 if ok else 0.1, {"OCT": 1.0}, "OCT", [] if ok else ["quality 0.10 below 0.50"]))
            self.seen += 1
        self.shown_prompts.append(prompt)
        return verdicts


def test_draws_batches_until_enough_pass_and_keeps_their_chains(policy):
    selector = ScriptedSelector(passing={1, 4, 6, 7, 9})
    sampler = RejectionSampler(policy, selector, SamplerConfig(survivors=3, batch_size=3, max_draws=12))
    result = sampler.draw(PROMPT, seed=5, **FAST)
    # batches of 3: candidates 0-2 (1 passes), 3-5 (4 passes), 6-8 (6 passes; 7 passes but is not needed)
    assert result.drawn == 9 and result.passed == 4 and result.complete
    assert [c.index for c in result.survivors] == [1, 4, 6]
    assert [c.index for c in result.rejected] == [0, 2, 3, 5, 8]
    assert result.pass_rate == pytest.approx(4 / 9)
    assert result.message() == "3 of 3 candidates passed the selector (9 drawn, pass rate 44%)"
    # the survivors' chains are exactly what a plain draw of their seeds gives
    alone = policy.sample(PROMPT, seeds=[c.seed for c in result.survivors], **FAST)
    assert result.trajectory.seeds == [c.seed for c in result.survivors]
    assert torch.allclose(result.trajectory.latents, alone.trajectory.latents, atol=1e-3)
    assert np.abs(np.asarray(result.survivors[2].image, float) - np.asarray(alone.images[2], float)).max() <= 2
    assert selector.shown_prompts == [PROMPT] * 3
    # joined from three draws, the group is re-scored in its own layout: GRPO's ratio starts at exactly 1
    assert torch.equal(policy.log_probs(result.trajectory), result.trajectory.log_probs)


def test_first_batch_is_the_plain_group_of_that_seed(policy):
    sampler = RejectionSampler(policy, ScriptedSelector(passing=set(range(16))), SamplerConfig(survivors=2, batch_size=2))
    result = sampler.draw(PROMPT, seed=11, **FAST)
    plain = policy.sample(PROMPT, n=2, seed=11, **FAST)
    assert result.drawn == 2 and [c.seed for c in result.survivors] == plain.trajectory.seeds
    assert torch.equal(result.trajectory.latents, plain.trajectory.latents)


def test_budget_spent_returns_what_passed_and_never_pads(policy):
    sampler = RejectionSampler(policy, ScriptedSelector(passing={2}), SamplerConfig(survivors=4, batch_size=4, max_draws=6))
    result = sampler.draw(PROMPT, seed=0, **FAST)
    assert result.drawn == 6 and not result.complete  # 4, then only the 2 the budget has left
    assert [c.index for c in result.survivors] == [2] and len(result.rejected) == 5
    assert result.trajectory.latents.shape[0] == 1
    assert result.message().startswith("only 1 of the 4 wanted candidates passed the selector: the budget of 6 draws is spent")
    nothing = RejectionSampler(policy, ScriptedSelector(passing=set()), SamplerConfig(max_draws=4)).draw(PROMPT, **FAST)
    assert nothing.survivors == [] and nothing.trajectory is None and nothing.pass_rate == 0.0


def test_refuses_more_survivors_than_the_budget(policy):
    sampler = RejectionSampler(policy, ScriptedSelector(set()), SamplerConfig(max_draws=8))
    with pytest.raises(ValueError, match="survivors must be between 1 and the draw budget 8, got 9"):
        sampler.draw(PROMPT, survivors=9, **FAST)
