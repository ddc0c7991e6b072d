"""The reward model learned from rankings: Bradley-Terry by hand, pairs, level weights, group splits, the ensemble."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from data.images import unit_to_pil
from data.modalities import MODALITIES
from data.phantoms import make_phantom
from data.simulated_experts import EXPERTS
from optim.preference.reward_model import (
    Comparison,
    PixelFeatures,
    accuracy_by_modality,
    RewardModel,
    RewardModelConfig,
    bradley_terry_loss,
    comparisons_from_rankings,
    comparisons_from_ratings,
    confident_tiers,
    featurizer,
    fit_best,
    pairwise_accuracy,
    group_folds,
)
from optim.preference.rewards import RankingError
from optim.verification import wilson_interval


class Brightness:
    """A one-number featurizer for hand-worked heads: each image's mean grey level."""

    name = "mean grey"

    def __call__(self, images):
        return torch.tensor([[np.asarray(image.convert("L"), dtype=np.float64).mean() / 255] for image in images])


def grey(level: int) -> Image.Image:
    return Image.new("L", (32, 32), level)


def test_bradley_terry_loss_and_gradient_by_hand():
    # Rewards 0.5, 0, 1; pairs image 0 beats 1 (weight 3) and image 1 beats 2 (weight 1).
    # Loss = (3 * -log sigmoid(0.5) + 1 * -log sigmoid(-1)) / 4 = (3 * 0.474077 + 1.313262) / 4.
    # d/dr(winner) of -log sigmoid(r_w - r_l) is -sigmoid(r_l - r_w): pair 1 gives -3 * 0.377541 / 4
    # to image 0 and the opposite to image 1; pair 2 gives -0.731059 / 4 to image 1 and the opposite to image 2.
    rewards = torch.tensor([0.5, 0.0, 1.0], dtype=torch.float64, requires_grad=True)
    loss = bradley_terry_loss(rewards, [0, 1], [1, 2], [3.0, 1.0])
    loss.backward()
    assert loss.item() == pytest.approx(0.6838731600, abs=1e-9)
    assert rewards.grad.tolist() == pytest.approx([-0.2831555016, 0.2831555016 - 0.1827646447, 0.1827646447], abs=1e-9)


def test_bradley_terry_loss_holds_at_large_margins():
    rewards = torch.tensor([0.0, 800.0], dtype=torch.float64)
    assert bradley_terry_loss(rewards, [0], [1], [1.0]).item() == pytest.approx(800.0)  # -log sigmoid(-800), no inf
    assert bradley_terry_loss(rewards, [1], [0], [1.0]).item() == pytest.approx(0.0)


def test_rankings_give_every_cross_tier_pair_and_ties_give_none():
    ids = ["a", "b", "c", "d"]
    # a best, b and c tied, d worst: 5 pairs, none between b and c; images start at offset 10.
    pairs = comparisons_from_rankings("g1", 10, ids, [([["a"], ["b", "c"], ["d"]], 2)])
    assert [(p.winner, p.loser) for p in pairs] == [(10, 11), (10, 12), (10, 13), (11, 13), (12, 13)]
    assert {p.group for p in pairs} == {"g1"} and {p.weight for p in pairs} == {2.0}
    assert comparisons_from_rankings("g2", 0, ids, [([["a", "b", "c", "d"]], 3)]) == []  # all tied: nothing
    with pytest.raises(RankingError, match="leaves out candidates: d"):
        comparisons_from_rankings("g3", 0, ids, [([["a"], ["b", "c"]], 3)])


def test_each_expert_level_is_the_weight_of_its_pairs():
    ids = [0, 1]
    pairs = comparisons_from_rankings("g", 0, ids, [([[0], [1]], 3), ([[1], [0]], 1)])
    assert pairs == [Comparison("g", 0, 1, 3.0), Comparison("g", 1, 0, 1.0)]
    with pytest.raises(ValueError, match="expert level 4"):
        comparisons_from_rankings("g", 0, ids, [([[0], [1]], 4)])


def test_level_weights_set_the_fitted_odds():
    # Image 0 beats image 1 at level 3 and loses at level 1. With no L2 the Bradley-Terry optimum
    # has sigmoid(r0 - r1) = 3 / (3 + 1), so r0 - r1 = log 3 exactly; unweighted it would be 0.
    images = [grey(70), grey(180)]
    pairs = comparisons_from_rankings("g", 0, [0, 1], [([[0], [1]], 3), ([[1], [0]], 1)])
    config = RewardModelConfig(features="pixels", members=1, l2=0.0)
    model = RewardModel.fit(images, pairs, PixelFeatures(), config)
    mean, spread = model.scores(images)
    assert mean[0] - mean[1] == pytest.approx(math.log(3), abs=1e-5)
    assert spread.tolist() == [0.0, 0.0]
    assert model.metrics["heldout_accuracy"] is None and model.metrics["heldout_pairs"] == 0  # one group: none held out
    assert model.metrics["train_accuracy"] == pytest.approx(0.75)  # the level-3 pair right, the level-1 pair wrong


def test_ratings_give_pairs_within_a_prompt_weighted_by_the_mean_level():
    rows = [
        {"prompt": "CT: p", "rating": 3, "level": 3, "index": 0},
        {"prompt": "CT: p", "rating": 1, "level": 1, "index": 1},
        {"prompt": "CT: p", "rating": 3, "level": 2, "index": 2},  # ties image 0: no pair between them
        {"prompt": "OCT: q", "rating": 2, "level": 1, "index": 3},
        {"prompt": "OCT: q", "rating": 1, "level": 3, "index": 3},  # the same image rated again: no pair with itself
        {"prompt": "OCT: q", "rating": 2.5, "level": 2, "index": 4},
    ]
    assert comparisons_from_ratings(rows) == [
        Comparison("CT: p", 0, 1, 2.0), Comparison("CT: p", 2, 1, 1.5),
        Comparison("OCT: q", 4, 3, 1.5), Comparison("OCT: q", 4, 3, 2.5),
    ]
    with pytest.raises(ValueError, match="ratings row 1: rating 'high'"):
        comparisons_from_ratings([rows[0], {**rows[1], "rating": "high"}])
    with pytest.raises(ValueError, match="ratings row 0: expert level 0"):
        comparisons_from_ratings([{**rows[0], "level": 0}])
    with pytest.raises(ValueError, match="ratings row 0: no 'index'"):
        comparisons_from_ratings([{"prompt": "CT: p", "rating": 3, "level": 3}])


def test_group_folds_hold_out_every_group_once_and_never_split_a_group():
    pairs = [Comparison(f"g{g}", 4 * g + k, 4 * g + k + 1, 3.0) for g in range(10) for k in range(3)]
    folds = group_folds(pairs, 4, seed=1)
    assert len(folds) == 4 and sorted(len({c.group for c in held}) for _, held in folds) == [2, 2, 3, 3]
    for train, held in folds:
        assert not {c.group for c in train} & {c.group for c in held}  # a group is on one side only
        assert sorted(train + held, key=pairs.index) == pairs
    assert sorted((c for _, held in folds for c in held), key=pairs.index) == pairs  # every pair held out once
    assert group_folds(pairs, 4, seed=1) == folds  # the seed fixes the folds
    assert group_folds(pairs, 4, seed=2) != folds
    assert group_folds(pairs[:3], 5, seed=1) == []  # one group: nothing to hold out
    assert [len(held) for _, held in group_folds(pairs[:6], 5, seed=1)] == [3, 3]  # two groups: two folds
    assert group_folds(pairs, 1, seed=1) == group_folds(pairs, 0, seed=1) == []


def test_ensemble_spread_and_agreement_by_hand():
    images = [grey(0), grey(51), grey(102)]  # mean grey 0, 0.2, 0.4
    zero, one = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    config = RewardModelConfig(features="pixels", members=3)
    same = RewardModel(Brightness(), config, zero, one, torch.tensor([[5.0], [5.0], [5.0]]))
    mean, spread = same.scores(images)
    assert mean.tolist() == pytest.approx([0.0, 1.0, 2.0]) and spread.tolist() == [0.0, 0.0, 0.0]
    assert same.rank(["a", "b", "c"], images) == ([["c"], ["b"], ["a"]], 1.0)
    # Heads 1, 1, -1: rewards x, x, -x; mean x / 3, spread sqrt(((2x/3)^2 * 2 + (4x/3)^2) / 3) = 0.942809 x.
    # The third member orders all 3 pairs against the mean: agreement 6 of 9.
    split = RewardModel(Brightness(), config, zero, one, torch.tensor([[1.0], [1.0], [-1.0]]))
    mean, spread = split.scores(images)
    assert mean.tolist() == pytest.approx([0.0, 0.2 / 3, 0.4 / 3])
    assert spread.tolist() == pytest.approx([0.0, 0.2 * 0.9428090416, 0.4 * 0.9428090416])
    tiers, agreement = split.rank(["a", "b", "c"], images)
    assert tiers == [["c"], ["b"], ["a"]] and agreement == pytest.approx(2 / 3)
    assert split.rank(["a", "b"], [grey(51), grey(51)])[0] == [["a", "b"]]  # equal means share a tier
    assert split.rank(["a"], [grey(51)]) == ([["a"]], 1.0)
    # Mean scores 0, 1, 2: gaps of 1.0, a win probability of sigmoid(1) = 0.731 each.
    assert same.rank(["a", "b", "c"], images, min_probability=0.7)[0] == [["c"], ["b"], ["a"]]
    assert same.rank(["a", "b", "c"], images, min_probability=0.75)[0] == [["c", "b", "a"]]


def test_confident_tiers_tie_what_the_model_cannot_tell_apart():
    """Gaps below logit(p) join the previous tier: at 0.8 the gap must reach log(4) = 1.386."""
    assert confident_tiers([3.0, 0.0, 1.0, 0.5], 0.8) == [[0], [2, 3, 1]]  # by score 0, 2, 3, 1: gaps 2.0, 0.5, 0.5
    assert confident_tiers([4.0, 0.0, 2.5, 1.0], 0.8) == [[0], [2], [3, 1]]  # gaps 1.5, 1.5, 1.0
    assert confident_tiers([3.0, 0.0, 1.5, 0.5]) == [[0], [2], [3], [1]]  # 0.5: only equal scores tie
    assert confident_tiers([1.0, 1.0, 0.0]) == [[0, 1], [2]]
    assert confident_tiers([]) == []
    with pytest.raises(ValueError, match=r"tie probability must be in \[0.5, 1\), got 1.0"):
        confident_tiers([1.0, 0.0], 1.0)


def phantom_groups(count: int, expert: str):
    """``count`` groups of 4 phantoms (one modality a group, modalities in turn) ranked by a simulated expert."""
    images, pairs = [], []
    for g in range(count):
        ids = [f"c{k}" for k in range(4)]
        group = [unit_to_pil(make_phantom(MODALITIES[g % len(MODALITIES)], 1000 * g + k).image) for k in range(4)]
        pairs += comparisons_from_rankings(f"g{g}", len(images), ids, [(EXPERTS[expert].rank(ids, group), 3)])
        images += group
    return images, pairs


def test_bootstrap_members_differ_and_their_spread_is_positive():
    images, pairs = phantom_groups(12, "brightness")
    model = RewardModel.fit(images, pairs, PixelFeatures(), RewardModelConfig(features="pixels", members=4, seed=3))
    assert model.heads.shape == (4, 27)
    _, spread = model.scores(images)
    assert (spread > 0).all()
    assert 0.5 < model.rank([0, 1, 2, 3], images[:4])[1] <= 1.0


def test_save_and_load_give_the_same_scores(tmp_path):
    images, pairs = phantom_groups(8, "contrast")
    model = RewardModel.fit(images, pairs, PixelFeatures(), RewardModelConfig(features="pixels", members=3))
    seen = {"groups": ["g0", "g1"], "rankings": [1, 2, 3]}
    model.save(tmp_path / "rm", seen)
    assert sorted(p.name for p in (tmp_path / "rm").iterdir()) == ["reward_model.json", "reward_model.safetensors"]
    loaded = RewardModel.load(tmp_path / "rm", PixelFeatures())
    for before, after in zip(model.scores(images), loaded.scores(images)):
        np.testing.assert_array_equal(before, after)
    assert loaded.seen == seen and loaded.metrics == model.metrics and loaded.config == model.config
    with pytest.raises(ValueError, match="trained on 'pixels' features"):
        RewardModel.load(tmp_path / "rm", featurizer("selector", selector=object()))
    with pytest.raises(FileNotFoundError, match="not a reward-model folder"):
        RewardModel.load(tmp_path, PixelFeatures())


def test_fit_refuses_what_it_cannot_learn_from():
    images = [grey(10), grey(200)]
    with pytest.raises(ValueError, match="no comparisons"):
        RewardModel.fit(images, [], PixelFeatures(), RewardModelConfig(features="pixels"))
    with pytest.raises(ValueError, match="gives 'pixels' features but the config asks for 'latents'"):
        RewardModel.fit(images, [Comparison("g", 0, 1, 1.0)], PixelFeatures(), RewardModelConfig(features="latents"))
    with pytest.raises(ValueError, match="outside the 2 given"):
        RewardModel.fit(images, [Comparison("g", 0, 2, 1.0)], PixelFeatures(), RewardModelConfig(features="pixels"))
    with pytest.raises(ValueError, match="unknown reward-model features 'pixel'"):
        RewardModelConfig(features="pixel").check()


class Noise:
    """Features that know nothing of the images (3 random numbers each), under a real feature set's name."""

    name = "selector"

    def __call__(self, images):
        return torch.from_numpy(np.random.default_rng(0).normal(size=(len(images), 3)))


def test_fit_best_keeps_the_features_that_order_held_out_groups_best():
    # The brightness expert ranks 16 groups of phantoms: the pixel statistics hold its score (the mean grey
    # level), the noise nothing, so the held-out groups must choose the pixels, whichever is offered first.
    images, pairs = phantom_groups(16, "brightness")
    for order in ((Noise(), PixelFeatures()), (PixelFeatures(), Noise())):
        config = RewardModelConfig(features=tuple(f.name for f in order), members=2, folds=4)
        model = fit_best(images, pairs, order, config)
        compared = model.metrics["features_compared"]
        assert model.config.features == model.metrics["features"] == "pixels" and model.heads.shape == (2, 27)
        assert list(compared) == list(config.features)
        assert compared["pixels"] == model.metrics["heldout_accuracy"] >= 0.8 and compared["selector"] < 0.6
    # One feature set: fit_best is fit.
    alone = fit_best(images, pairs, [PixelFeatures()], RewardModelConfig(features="pixels", members=2, folds=4))
    assert alone.metrics["features_compared"] == {"pixels": alone.metrics["heldout_accuracy"]}
    with pytest.raises(ValueError, match=r"featurizers give \['pixels'\] features but the config asks for \['selector', 'pixels'\]"):
        fit_best(images, pairs, [PixelFeatures()], RewardModelConfig(features=("selector", "pixels")))
    with pytest.raises(ValueError, match="fit takes one feature set"):
        RewardModel.fit(images, pairs, PixelFeatures(), RewardModelConfig(features=("selector", "pixels")))
    with pytest.raises(ValueError, match="names no feature set"):
        RewardModelConfig(features=()).check()


def test_pairwise_accuracy_counts_equal_rewards_half_and_weighs_by_level():
    pairs = [Comparison("g", 0, 1, 3.0), Comparison("g", 1, 2, 1.0), Comparison("g", 2, 3, 2.0)]
    rewards = [2.0, 1.0, 1.5, 1.5]  # right, wrong, equal
    assert pairwise_accuracy(rewards, pairs) == pytest.approx((3 + 0 + 1) / 6)
    assert pairwise_accuracy(rewards, pairs, weighted=False) == pytest.approx(1.5 / 3)


def test_heldout_accuracy_per_modality_by_hand():
    """CT: margins right (level 3), wrong, equal: weighted (3 + 0 + 0.5) / 5 = 0.7, unweighted 1.5 of 3 with
    Wilson's 95% interval (0.125, 0.875); MRI: 1 of 1 right; the unmapped group's pair counts nowhere."""
    pairs = [Comparison("g1", 0, 1, 3.0), Comparison("g1", 1, 2, 1.0), Comparison("g2", 4, 5, 1.0),
             Comparison("g3", 6, 7, 1.0), Comparison("g4", 8, 9, 1.0)]
    by_modality = accuracy_by_modality([1.0, -1.0, 0.0, 2.0, -3.0], pairs, {"g1": "CT", "g2": "CT", "g3": "MRI"})
    assert list(by_modality) == ["CT", "MRI"]
    ct = by_modality["CT"]
    assert ct["pairs"] == 3 and ct["accuracy"] == pytest.approx(0.7)
    assert (ct["low"], ct["high"]) == pytest.approx((0.12533, 0.87467), abs=1e-5) == wilson_interval(1.5, 3)
    assert by_modality["MRI"]["pairs"] == 1 and by_modality["MRI"]["accuracy"] == 1.0
    assert by_modality["MRI"]["low"] == pytest.approx(wilson_interval(1, 1)[0])  # 0.2065: one pair shows little


def test_learns_a_simulated_experts_preference_on_held_out_groups(policy):
    # The brightness expert ranks 32 groups of phantoms (one modality a group); the reward model on
    # the generator's VAE latents (the default features) must order the pairs of groups it never saw
    # far better than chance (0.5). Phantoms of one modality barely differ in contrast (many such
    # groups tie throughout), so the contrast expert is left to the benchmark's generated groups.
    images, pairs = phantom_groups(32, "brightness")
    modality_of = {f"g{g}": MODALITIES[g % len(MODALITIES)] for g in range(32)}
    model = RewardModel.fit(images, pairs, featurizer("latents", policy=policy), RewardModelConfig("latents", folds=4),
                            modality_of=modality_of)
    metrics = model.metrics
    by_modality = metrics["heldout_by_modality"]
    assert set(by_modality) == set(MODALITIES) and sum(m["pairs"] for m in by_modality.values()) == len(pairs)
    assert all(m["low"] <= m["accuracy"] <= m["high"] for m in by_modality.values())  # one level: weighted = unweighted
    assert metrics["features"] == "latents" and metrics["members"] == 5
    assert metrics["folds"] == 4 and metrics["heldout_groups"] == metrics["groups"] >= 24  # every group held out once
    assert metrics["heldout_accuracy"] >= 0.85 and metrics["heldout_accuracy_unweighted"] >= 0.85
    assert metrics["heldout_pairs"] == metrics["pairs"] == len(pairs)
