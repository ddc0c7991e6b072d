"""GRPO and Diffusion-DPO on the embedded generator: hand-worked numbers, one-step effects, update guards."""

import dataclasses
import math

import pytest
import torch

from optim.preference import grpo, update
from optim.preference.dpo import DPOConfig
from optim.preference.groups import AIRanking, RankedGroup
from optim.preference.grpo import GRPOConfig, group_advantages
from optim.preference.losses import group_losses
from optim.preference.rewards import RankingError
from optim.preference.update import UpdateConfig, apply_update, dpo_backward, grpo_backward
from optim.versions import VersionStore
from tests.conftest import FAST, PROMPT

IDS = ["c0", "c1", "c2", "c3"]


@pytest.fixture()
def fresh(policy):
    """The shared policy with its adapters back at zero after each test."""
    start = policy.lora_state_dict()
    yield policy
    policy.load_lora_state_dict(start)
    policy.version = None


@pytest.fixture(scope="module")
def drawn(policy):
    return policy.sample(PROMPT, n=4, seed=3, **FAST).trajectory


def ranked(trajectory, tiers=(["c2"], ["c0", "c3"], ["c1"]), level=3):
    return RankedGroup("g1", IDS, trajectory, [([list(t) for t in tiers], level)])


def test_advantages_for_best_middle_worst_under_each_std_convention():
    rewards = [torch.tensor([1.0, 0.5, 0.0])]
    group = group_advantages(rewards, GRPOConfig(scale_rewards="group", eps=0.0))[0]
    assert group.tolist() == pytest.approx([1.0, 0.0, -1.0])  # sample std 0.5
    assert group_advantages(rewards, GRPOConfig(scale_rewards="none"))[0].tolist() == pytest.approx([0.5, 0.0, -0.5])
    two = [torch.tensor([1.0, 0.5, 0.0]), torch.tensor([1.0, 0.0])]
    batch = group_advantages(two, GRPOConfig(scale_rewards="batch", eps=0.0))
    batch_std = torch.tensor([1.0, 0.5, 0.0, 1.0, 0.0]).std().item()  # 0.4472
    assert batch[0].tolist() == pytest.approx([0.5 / batch_std, 0.0, -0.5 / batch_std])
    assert batch[1].tolist() == pytest.approx([0.5 / batch_std, -0.5 / batch_std])
    assert group_advantages([torch.tensor([0.5, 0.5])])[0].tolist() == [0.0, 0.0]  # all tied: no signal
    clipped = group_advantages([torch.tensor([1.0] + [0.0] * 99)], GRPOConfig(advantage_clip=5.0))[0]
    assert clipped.max().item() == 5.0
    with pytest.raises(ValueError, match="scale_rewards must be one of group, batch, none"):
        group_advantages(rewards, GRPOConfig(scale_rewards="mean"))


def test_group_rewards_and_pairs_follow_the_ranking_and_refuse_unknown_candidates(drawn):
    group = ranked(drawn)
    assert group.rewards().tolist() == pytest.approx([0.5, 0.0, 1.0, 0.5])
    assert group.pairs() == [(2, 0, 3.0), (2, 3, 3.0), (2, 1, 3.0), (0, 1, 3.0), (3, 1, 3.0)]
    with pytest.raises(RankingError, match="unknown candidates: c9"):
        ranked(drawn, tiers=(["c9"], ["c0", "c1", "c2", "c3"]))


def test_before_any_update_ratio_is_exactly_one_and_dpo_loss_is_ln2(fresh, drawn):
    numbers = group_losses(fresh, ranked(drawn))
    assert [c["ratio"] for c in numbers["grpo"]["candidates"]] == [1.0, 1.0, 1.0, 1.0]
    assert [c["kl"] for c in numbers["grpo"]["candidates"]] == [0.0, 0.0, 0.0, 0.0]  # LoRA B = 0: the reference
    assert [c["advantage"] for c in numbers["grpo"]["candidates"]] == pytest.approx([0.0, -1.2247, 1.2247, 0.0], abs=1e-3)
    dpo = numbers["dpo"]
    assert dpo["loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert all(p["margin"] == 0.0 and p["loss"] == pytest.approx(math.log(2)) for p in dpo["pairs"])
    assert dpo["accuracy"] == 0.5 and [p["winner"] for p in dpo["pairs"]] == ["c2", "c2", "c2", "c0", "c3"]


def test_dpo_hinge_and_ipo_at_the_reference_are_hand_worked(fresh, drawn):
    for loss_type, expected in (("hinge", 1.0), ("ipo", (1 / (2 * 5000.0)) ** 2)):
        config = UpdateConfig(dpo=DPOConfig(loss_type=loss_type))
        assert group_losses(fresh, ranked(drawn), config)["dpo"]["loss"] == pytest.approx(expected, rel=1e-6)


def test_one_dpo_step_raises_the_winners_implicit_reward_over_the_losers(fresh, drawn, tmp_path):
    group = ranked(drawn, tiers=(["c2"], ["c1"], ["c0"], ["c3"]))
    config = UpdateConfig(algorithm="dpo", learning_rate=1e-3, epochs=1, kl_budget=float("inf"))
    result = apply_update(fresh, VersionStore(tmp_path / "versions"), [group], config)
    assert result.applied, result.message
    after = group_losses(fresh, group, config)["dpo"]
    assert after["loss"] < math.log(2)
    assert sum(p["margin"] for p in after["pairs"]) > 0 and after["accuracy"] > 0.5


def test_one_grpo_step_raises_the_log_prob_of_the_positive_advantage_chain(fresh, drawn, tmp_path):
    group = ranked(drawn, tiers=(["c2"], ["c0", "c1", "c3"]))
    before = fresh.log_probs(drawn).mean(dim=1)
    config = UpdateConfig(algorithm="grpo", learning_rate=1e-3, epochs=1, kl_budget=float("inf"))
    assert apply_update(fresh, VersionStore(tmp_path / "versions"), [group], config).applied
    change = fresh.log_probs(drawn).mean(dim=1) - before
    assert change[2] > 0 and change[2] > change[[0, 1, 3]].max()


def test_a_nan_loss_leaves_the_weights_untouched_and_nothing_is_saved(fresh, drawn, monkeypatch, tmp_path):
    store = VersionStore(tmp_path / "versions")
    fresh.open_versions(store)
    weights = fresh.lora_state_dict()
    real_step = update.grpo_step
    calls = []

    def poisoned(*args, **kwargs):  # the second optimizer step's loss turns NaN
        terms = real_step(*args, **kwargs)
        calls.append(1)
        if len(calls) > FAST["steps"]:
            terms.loss = terms.loss * float("nan")
        return terms

    monkeypatch.setattr(update, "grpo_step", poisoned)
    result = apply_update(fresh, store, [ranked(drawn)], UpdateConfig(epochs=3, learning_rate=1e-3, train_fraction=1.0))
    assert not result.applied and result.version is None
    assert result.message.startswith("update refused: the GRPO loss is not finite (nan): no step was taken")
    assert result.message.endswith("v0 stays current")
    assert all(torch.equal(weights[k], v) for k, v in fresh.lora_state_dict().items())
    assert [v.id for v in store.list()] == ["v0"] and store.current == "v0"


def test_an_update_over_the_kl_budget_is_refused_and_the_previous_version_stays(fresh, drawn, tmp_path):
    store = VersionStore(tmp_path / "versions")
    fresh.open_versions(store)
    weights = fresh.lora_state_dict()
    config = UpdateConfig(learning_rate=1e-2, epochs=2, kl_budget=1e-9)
    result = apply_update(fresh, store, [ranked(drawn)], config)
    assert not result.applied and "over the budget 1e-09" in result.message
    assert all(torch.equal(weights[k], v) for k, v in fresh.lora_state_dict().items())
    assert store.current == "v0"


def test_grpo_watches_the_untrained_steps_of_the_first_kl_groups_only(fresh, drawn, tmp_path, monkeypatch):
    """The trained steps' KL comes with the training pass; the untrained steps' costs a forward pass each, so
    GRPO's trust region measures those on the first ``kl_groups`` groups (the experts', before AI groups)."""
    store = VersionStore(tmp_path / "versions")
    fresh.open_versions(store)
    weights = fresh.lora_state_dict()
    real_score_step, passes = fresh.score_step, []

    def counting(*args, **kwargs):
        passes.append(torch.is_grad_enabled())
        return real_score_step(*args, **kwargs)

    monkeypatch.setattr(fresh, "score_step", counting)
    without_gradients = {}
    for kl_groups in (1, 8):
        passes.clear()
        fresh.load_lora_state_dict(weights)
        config = UpdateConfig(epochs=2, min_steps_per_pass=1, train_fraction=0.5, kl_budget=float("inf"),
                              kl_groups=kl_groups, seed=0)  # one full-batch step a pass: the counts below
        assert apply_update(fresh, store, [ranked(drawn), RankedGroup("g2", IDS, drawn, ranked(drawn).rankings)],
                            config).applied
        without_gradients[kl_groups] = passes.count(False)
    scored = len(drawn.scored_steps())
    untrained = scored - max(1, round(0.5 * scored))
    # the second group's untrained steps: before each of the 2 optimizer steps and once after the last
    assert without_gradients[8] - without_gradients[1] == 3 * untrained > 0


def test_each_pass_deals_every_group_once_into_minibatches_of_near_equal_size():
    generator = torch.Generator().manual_seed(0)
    batches = update.step_batches(list(range(9)), 5, 2, generator)  # ceil(9 / 5) = 2 steps a pass: 5 and 4 groups
    assert [len(b) for b in batches] == [5, 4, 5, 4]
    for first, second in (batches[0:2], batches[2:4]):
        assert sorted(first + second) == list(range(9))
    assert batches[0] != batches[2]  # a fresh order each pass
    assert update.step_batches([0, 1, 2], 5, 3, generator) == [[0, 1, 2]] * 3  # up to 5 groups: one full-batch step a pass
    five = update.step_batches(list(range(5)), 5, 2, generator, min_steps=2)  # at least 2 a pass: 3 and 2 groups
    assert [len(b) for b in five] == [3, 2, 3, 2] and sorted(five[0] + five[1]) == list(range(5))
    assert [len(b) for b in update.step_batches(list(range(13)), 5, 1, generator, min_steps=2)] == [5, 4, 4]
    assert update.step_batches([3], 5, 2, generator, min_steps=2) == [[3], [3]]  # never an empty step
    assert update.step_batches([4, 7], 0, 2, generator, min_steps=2) == [[4, 7]] * 2  # 0: every group in one step
    assert update.step_batches([], 5, 2, generator) == []
    with pytest.raises(ValueError, match="min_steps_per_pass >= 1"):
        update.step_batches([0, 1], 5, 1, generator, min_steps=0)


def test_a_step_trains_its_minibatch_alone_and_the_update_counts_the_steps(fresh, drawn, tmp_path):
    store = VersionStore(tmp_path / "versions")
    fresh.open_versions(store)
    groups = [RankedGroup(f"g{k}", IDS, drawn, ranked(drawn).rankings) for k in range(3)]
    config = UpdateConfig(epochs=2, groups_per_step=2, train_fraction=0.25, kl_budget=float("inf"), seed=0)
    result = apply_update(fresh, store, groups, config)
    assert result.applied
    assert result.metrics["optimizer_steps_planned"] == result.metrics["optimizer_steps_taken"] == 4  # 2 a pass
    assert sorted(step["groups"] for step in result.metrics["steps"]) == [1, 1, 2, 2]


def test_an_applied_update_is_a_new_current_version_with_its_metrics(fresh, drawn, tmp_path):
    store = VersionStore(tmp_path / "versions")
    fresh.open_versions(store)
    result = apply_update(fresh, store, [ranked(drawn)], UpdateConfig(epochs=2))
    assert result.applied and result.version.id == "v1" and result.version.parent == "v0" and store.current == "v1"
    metrics = store.get("v1").metrics
    assert metrics["algorithm"] == "grpo" and metrics["groups"] == ["g1"] and len(metrics["steps"]) == 2
    assert metrics["steps"][0]["ratio_mean"] == 1.0 and metrics["kl_from_previous"] > 0
    assert result.message.startswith("v1 made from v0 by GRPO on 1 group(s): loss ")
    with pytest.raises(ValueError, match="groups without a ranking: g2"):
        apply_update(fresh, store, [RankedGroup("g2", IDS, drawn)], UpdateConfig())


def test_metrics_without_gradients_match_the_training_pass(fresh, drawn):
    group = ranked(drawn)
    with torch.no_grad():
        grpo_metrics = grpo_backward(fresh, [group], UpdateConfig())
        dpo_metrics = dpo_backward(fresh, [group], UpdateConfig(), torch.Generator().manual_seed(0))
    assert grpo_metrics["ratio_min"] == grpo_metrics["ratio_max"] == 1.0 and grpo_metrics["clip_fraction"] == 0.0
    assert dpo_metrics["pairs"] == 5 and dpo_metrics["loss"] == pytest.approx(math.log(2))



def test_an_error_mid_update_restores_the_weights_before_it_propagates(fresh, drawn, monkeypatch, tmp_path):
    weights = fresh.lora_state_dict()
    real_step, calls = update.grpo_step, []

    def failing(*args, **kwargs):  # out of memory in the second optimizer step, after one step was taken
        calls.append(1)
        if len(calls) > FAST["steps"]:
            raise RuntimeError("out of memory")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(update, "grpo_step", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        apply_update(fresh, VersionStore(tmp_path / "versions"), [ranked(drawn)],
                     UpdateConfig(epochs=3, learning_rate=1e-3, train_fraction=1.0))
    assert all(torch.equal(weights[k], v) for k, v in fresh.lora_state_dict().items())


def test_grpo_weighs_each_group_by_its_experts_levels_spread_over_its_trained_steps(drawn):
    """Hand-worked: a level-3 group trained on 2 steps and a level-1 group on 1 step get call weights
    3/4 / 2 = 0.375 (twice) and 1/4 = 0.25; equal levels would have weighed the groups the same."""
    senior, junior = ranked(drawn, level=3), ranked(drawn, level=1)
    assert senior.weight() == 3.0 and junior.weight() == 1.0
    two = RankedGroup("g2", IDS, drawn, [([["c0"], ["c1", "c2", "c3"]], 1), ([["c1"], ["c0", "c2", "c3"]], 2)])
    assert two.weight() == 3.0  # a group two experts ranked counts for both

    seen = []

    def run_step(group, trajectory, step, rows, advantage, weight, last):
        seen.append((step, weight, last))
        zero = torch.zeros(4)
        return grpo.GRPOStepTerms(torch.tensor(1.0), torch.ones(4), zero, zero.bool(), torch.tensor(0.0), zero, 1.0)

    advantages = group_advantages([senior.rewards(), junior.rewards()])
    metrics = grpo.grpo_pass([drawn, drawn], advantages, run_step, [senior.weight(), junior.weight()], [[0, 2], [1]])
    assert seen == [(0, 0.375, False), (2, 0.375, False), (1, 0.25, True)]
    seen.clear()  # a minibatch without the senior group: the junior group's step carries the whole weight
    grpo.grpo_pass([drawn, drawn], advantages, run_step, [senior.weight(), junior.weight()], [[], [1]])
    assert seen == [(1, 1.0, True)]
    assert metrics["loss"] == pytest.approx(1.0)  # the weights sum to 1


def test_noise_weighting_spreads_a_groups_weight_over_its_steps_by_their_std(drawn):
    """Hand-worked: a level-3 group on steps with std 0.6 and 0.2, a level-1 group on one step: call weights
    3/4 x 0.6/0.8 = 0.5625 and 3/4 x 0.2/0.8 = 0.1875, then 1/4 (evenly: 0.375 twice); a bad name is refused."""
    senior, junior = ranked(drawn, level=3), ranked(drawn, level=1)
    seen = []

    def run_step(group, trajectory, step, rows, advantage, weight, last):
        seen.append((step, weight))
        zero = torch.zeros(4)
        return grpo.GRPOStepTerms(torch.tensor(1.0), torch.ones(4), zero, zero.bool(), torch.tensor(0.0), zero, 1.0)

    stds = {0: 0.6, 1: 0.3, 2: 0.2}
    advantages = group_advantages([senior.rewards(), junior.rewards()])
    grpo.grpo_pass([drawn, drawn], advantages, run_step, [senior.weight(), junior.weight()], [[0, 2], [1]],
                   step_std=lambda trajectory, step: stds[step])
    assert seen == [(0, pytest.approx(0.5625)), (2, pytest.approx(0.1875)), (1, pytest.approx(0.25))]
    seen.clear()
    grpo.grpo_pass([drawn, drawn], advantages, run_step, [senior.weight(), junior.weight()], [[0, 2], [1]])
    assert seen == [(0, pytest.approx(0.375)), (2, pytest.approx(0.375)), (1, pytest.approx(0.25))]

    class Schedule:  # what step_weigher asks a policy for
        def step_std(self, trajectory, step):
            return stds[step]

    assert grpo.step_weigher(grpo.GRPOConfig(step_weighting="noise"), Schedule())(drawn, 2) == 0.2
    assert grpo.step_weigher(grpo.GRPOConfig(step_weighting="uniform"), Schedule()) is None
    with pytest.raises(ValueError, match="step_weighting must be one of uniform, noise, got 'sigma'"):
        grpo.step_weigher(grpo.GRPOConfig(step_weighting="sigma"), Schedule())


def test_an_update_trains_a_seeded_subset_of_steps_and_records_the_seed(fresh, drawn, tmp_path):
    store = VersionStore(tmp_path / "versions")
    fresh.open_versions(store)
    generator = torch.Generator().manual_seed(5)
    plan = update.trained_steps([ranked(drawn)] * 3, 0.5, generator, window="random")
    assert [len(steps) for steps in plan] == [2, 2, 2] and all(s == sorted(set(s)) for s in plan)
    assert len(set(map(tuple, plan))) > 1  # each group its own draw
    assert plan == update.trained_steps([ranked(drawn)] * 3, 0.5, torch.Generator().manual_seed(5), window="random")
    assert update.trained_steps([ranked(drawn)] * 2, 0.5, generator) == [[0, 1], [0, 1]]  # early: the first half
    mixed = update.trained_steps([ranked(drawn)] * 8, 0.5, generator, window="mixed")
    assert all(steps[:2] == [0, 1] and len(steps) == 3 and steps[2] in (2, 3) for steps in mixed)  # and one later
    assert {steps[2] for steps in mixed} == {2, 3}  # drawn afresh for each group
    with pytest.raises(ValueError, match="train_fraction must be in"):
        update.trained_steps([ranked(drawn)], 0.0, generator)
    with pytest.raises(ValueError, match="train_window must be one of early, random, mixed, got 'late'"):
        update.trained_steps([ranked(drawn)], 0.5, generator, window="late")

    first = apply_update(fresh, store, [ranked(drawn)], UpdateConfig(epochs=1, train_fraction=0.25))
    second = apply_update(fresh, store, [ranked(drawn)], UpdateConfig(epochs=1, train_fraction=0.25))
    assert first.applied and second.applied
    assert len(first.metrics["trained_steps"][0]) == 1  # a quarter of 4 stored steps
    assert first.metrics["seed"] != second.metrics["seed"]  # a fresh draw of steps and noise each update
    pinned = apply_update(fresh, store, [ranked(drawn)], UpdateConfig(epochs=1, train_fraction=0.5, seed=11))
    assert pinned.metrics["seed"] == 11


def test_the_trust_region_keeps_the_last_step_within_the_kl_budget(fresh, drawn, tmp_path):
    """A budget just above the KL after one step: the update keeps the steps before the first one past it."""
    store = VersionStore(tmp_path / "versions")
    fresh.open_versions(store)
    start = fresh.lora_state_dict()
    settings = dict(learning_rate=1e-3, epochs=3, seed=1)
    free = apply_update(fresh, store, [ranked(drawn)], UpdateConfig(kl_budget=float("inf"), **settings))
    kls = [s["kl_before_step"] for s in free.metrics["steps"]] + [free.metrics["kl_from_previous"]]
    assert kls[0] == 0.0 and kls[1] > 0
    budget = kls[1] * 1.000001
    first_past = next((k for k in range(2, 4) if kls[k] > budget), None)
    assert first_past is not None, f"the KL never grew past the first step's: {kls}"
    fresh.load_lora_state_dict(start)
    fresh.use_version(store, "v0")

    result = apply_update(fresh, store, [ranked(drawn)], UpdateConfig(kl_budget=budget, **settings))
    kept = first_past - 1  # the weights after this many steps are the last within the budget
    assert result.applied and result.metrics["optimizer_steps_taken"] == kept and result.metrics["stopped_by_kl_budget"]
    assert result.metrics["kl_from_previous"] == pytest.approx(kls[kept])
    assert f"stopped after {kept} of 3 steps: the next would cross the KL budget" in result.message


def test_balanced_modalities_give_each_modality_the_same_share_of_the_experts_groups(drawn, monkeypatch):
    """Hand-worked: three CT groups, one brain MRI and one chest X-ray group ranked by experts: 5 / (3 modalities
    x 3 CTs) = 5/9 each CT group, 5 / 3 each other; an AI-ranked CT group keeps factor 1. GRPO's group weights
    are the levels (the AI weight) times these by default, and plain levels with ``balance_modalities`` off."""
    def group(prompt, ai=None):
        return RankedGroup(prompt, IDS, dataclasses.replace(drawn, prompt=prompt),
                           [] if ai else [([["c0"], ["c1", "c2", "c3"]], 3)], ai=ai)

    groups = [group("CT: abdomen"), group("MRI: axial brain"), group("CT: liver"), group("chest X-ray: PA view"),
              group("CT: kidneys"), group("CT: spleen", AIRanking([0.3, 0.1, 0.2, 0.0], 1.0, 1.5, [[0], [2], [1], [3]]))]
    assert update.modality_balance(groups) == pytest.approx([5 / 9, 5 / 3, 5 / 9, 5 / 3, 5 / 9, 1.0])
    seen = {}
    monkeypatch.setattr(update, "grpo_pass", lambda trajectories, advantages, run_step, weights, *rest: seen.update(w=weights))
    grpo_backward(None, groups, UpdateConfig())
    assert seen["w"] == pytest.approx([3 * 5 / 9, 3 * 5 / 3, 3 * 5 / 9, 3 * 5 / 3, 3 * 5 / 9, 1.5])  # each modality 5
    grpo_backward(None, groups, UpdateConfig(balance_modalities=False))
    assert seen["w"] == [3.0] * 5 + [1.5]
