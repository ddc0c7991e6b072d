"""Updates that fit: micro-batches with gradient accumulation give the whole batch's gradient, and an
update runs inside ``Policy.training()`` (gradient checkpointing on a GPU)."""

import pytest
import torch

from optim.preference.groups import RankedGroup
from optim.preference.grpo import micro_batches
from optim.preference.update import UpdateConfig, apply_update, dpo_backward, grpo_backward, kl_between, step_kernels
from optim.versions import VersionStore
from tests.conftest import FAST, PROMPT

IDS = ["c0", "c1", "c2", "c3", "c4"]


@pytest.fixture()
def moved(policy):
    """The shared policy with every adapter weight moved off its start (so A and B both get gradients and
    the GRPO ratio is not 1), put back after the test."""
    start = policy.lora_state_dict()
    generator = torch.Generator().manual_seed(0)
    policy.load_lora_state_dict({k: v + 0.02 * torch.randn(v.shape, generator=generator) for k, v in start.items()})
    yield policy
    policy.load_lora_state_dict(start)
    policy.version = None


@pytest.fixture(scope="module")
def groups(policy):
    """Two groups of five (five: micro-batches of 2 and 3 leave a short last one), ranked by experts of levels 3 and 1."""
    first = policy.sample(PROMPT, n=5, seed=3, **FAST).trajectory
    second = policy.sample("CT: axial slice with a bright lesion", n=5, seed=4, **FAST).trajectory
    return [RankedGroup("g1", IDS, first, [([["c2"], ["c0", "c3"], ["c1"], ["c4"]], 3)]),
            RankedGroup("g2", IDS, second, [([["c4"], ["c1"], ["c0", "c2", "c3"]], 1)])]


def gradients(policy, backward) -> tuple[dict, list[torch.Tensor]]:
    parameters = policy.lora_parameters()
    for p in parameters:
        p.grad = None
    metrics = backward()
    grads = [p.grad.clone() for p in parameters]
    for p in parameters:
        p.grad = None
    return metrics, grads


def assert_same_gradients(whole, parts):
    scale = max(g.abs().max() for g in whole)
    assert scale > 0
    for a, b in zip(whole, parts):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4 * float(scale))  # float32 sums in another order


def test_micro_batches_cover_the_rows_once():
    assert micro_batches(5, 2) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert micro_batches(5, 0) == [slice(0, 5)] and micro_batches(3, 8) == [slice(0, 3)]
    with pytest.raises(ValueError, match="micro_batch must be 0"):
        micro_batches(5, -1)


@pytest.mark.parametrize("micro_batch", [1, 2, 3])
def test_grpo_micro_batches_give_the_whole_batchs_gradient(moved, groups, micro_batch):
    plan = [[0, 2], [1]]
    whole_metrics, whole = gradients(moved, lambda: grpo_backward(moved, groups, UpdateConfig(micro_batch=0), plan))
    metrics, parts = gradients(moved, lambda: grpo_backward(moved, groups, UpdateConfig(micro_batch=micro_batch), plan))
    assert_same_gradients(whole, parts)
    assert whole_metrics["ratio_min"] != 1.0  # the moved weights: a real ratio, not the trivial one
    for key in ("loss", "approx_kl", "kl_to_reference", "clip_fraction", "ratio_mean", "ratio_min", "ratio_max"):
        assert metrics[key] == pytest.approx(whole_metrics[key], rel=1e-4, abs=1e-6), key  # the loss: O(1) terms that cancel


@pytest.mark.parametrize("micro_batch", [12, 3])  # 3 pairs (the last short), and below one pair's draws (1 pair)
def test_dpo_micro_batches_give_the_whole_batchs_gradient(moved, groups, micro_batch):
    config = UpdateConfig(micro_batch=0)  # 4 noise draws a pair
    whole_metrics, whole = gradients(moved, lambda: dpo_backward(moved, groups, config, torch.Generator().manual_seed(7)))
    metrics, parts = gradients(moved, lambda: dpo_backward(moved, groups, UpdateConfig(micro_batch=micro_batch),
                                                           torch.Generator().manual_seed(7)))
    assert_same_gradients(whole, parts)
    assert metrics["pairs"] == whole_metrics["pairs"] == 9 + 7
    for key in ("loss", "implicit_accuracy", "margin_mean"):
        assert metrics[key] == pytest.approx(whole_metrics[key], rel=1e-4, abs=1e-6), key


def test_dpo_micro_batches_hold_whole_pairs_of_at_most_the_budget(moved, groups, monkeypatch):
    import optim.preference.update

    sizes, real = [], optim.preference.update.dpo_terms

    def counting(policy, winners, *args, **kwargs):
        sizes.append(winners.shape[0])
        return real(policy, winners, *args, **kwargs)

    monkeypatch.setattr(optim.preference.update, "dpo_terms", counting)
    with torch.no_grad():
        dpo_backward(moved, groups, UpdateConfig(micro_batch=12), torch.Generator().manual_seed(7))
    assert sizes == [3] * 5 + [1]  # 16 pairs, 3 at a time (x 4 draws = 12)


def test_the_trust_regions_kl_does_not_depend_on_the_micro_batch(moved, groups, policy):
    before = {size: step_kernels(policy, groups, micro_batch=size) for size in (0, 2)}
    with torch.no_grad():
        for p in policy.lora_parameters():
            p.add_(0.01)
    after = {size: step_kernels(policy, groups, micro_batch=size) for size in (0, 2)}
    # float32 in two batch layouts: the means differ in the last bits, and a KL of means this close to each
    # other amplifies that to about 1e-5; a wrong average over micro-batches would be off by far more.
    assert kl_between(before[2], after[2]) == pytest.approx(kl_between(before[0], after[0]), rel=1e-4)


def test_an_update_runs_with_gradient_checkpointing_when_the_policy_asks_for_it(policy, groups, monkeypatch, tmp_path):
    start = policy.lora_state_dict()
    monkeypatch.setattr(policy, "gradient_checkpointing", True)  # as on a GPU
    seen = []
    try:
        result = apply_update(policy, VersionStore(tmp_path / "versions"), groups[:1],
                              UpdateConfig(epochs=1, train_fraction=0.25, kl_budget=float("inf"), seed=0),
                              on_step=lambda done, total: seen.append(policy.unet.is_gradient_checkpointing))
    finally:
        policy.load_lora_state_dict(start)
        policy.version = None
    assert result.applied and seen == [True]
    assert not policy.unet.is_gradient_checkpointing  # off again after the update
