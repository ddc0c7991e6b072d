"""Rankings and ratings to rewards, pairs and weights: hand-worked values and the exact messages experts see."""

import math

import numpy as np
import pytest

from optim.preference.rewards import (
    RankingError, combined_rewards, level_weight, position_rewards, ranked_pairs, rating_reward,
    validate_ranking, weighted_pairs,
)

GROUP = ["c0", "c1", "c2", "c3"]


def test_validate_ranking_returns_lists_and_plain_ints():
    assert validate_ranking((("c2",), ("c0", "c3"), ["c1"]), GROUP) == [["c2"], ["c0", "c3"], ["c1"]]
    tiers = validate_ranking([[np.int64(2)], [0, 1]], candidates=[0, 1, 2])
    assert tiers == [[2], [0, 1]] and type(tiers[0][0]) is int


@pytest.mark.parametrize("tiers, candidates, message", [
    ([], None, "the ranking is empty"),
    ([["c0"], []], None, "tier 2 of the ranking is empty"),
    (["c0", "c1"], None, "tier 1 of the ranking is 'c0', not a list of candidate ids"),
    ([["c0", 1.5]], None, "tier 1 of the ranking holds 1.5, which is not a candidate id (a string or an integer)"),
    ([["c1"], ["c0", "c1"]], None, "candidate c1 appears twice in the ranking"),
    ([["c1"], ["c1"], ["c1"]], None, "candidate c1 appears 3 times in the ranking"),
    ([["c0", "c9"], ["c1", "c2", "c3"]], GROUP, "ranking names unknown candidates: c9 (this group has c0, c1, c2, c3)"),
    ([["c0"], ["c2"]], GROUP,
     "ranking leaves out candidates: c1, c3 (rank every one; tie those you cannot tell apart)"),
    ([["c0", "c0"], ["c9"], ["c1", "c2"]], GROUP,  # a typo for c3: every fault at once
     "candidate c0 appears twice in the ranking; "
     "ranking names unknown candidates: c9 (this group has c0, c1, c2, c3); "
     "ranking leaves out candidates: c3 (rank every one; tie those you cannot tell apart)"),
])
def test_faulty_rankings_name_the_offending_ids(tiers, candidates, message):
    with pytest.raises(RankingError) as caught:
        validate_ranking(tiers, candidates)
    assert str(caught.value) == message
    assert isinstance(caught.value, ValueError)


def test_position_rewards_are_linear_and_ties_share_their_mean_position():
    assert position_rewards([["a"], ["b", "c"], ["d"]]) == {"a": 1.0, "b": 0.5, "c": 0.5, "d": 0.0}
    assert position_rewards([["a", "b"], ["c"]]) == {"a": 0.75, "b": 0.75, "c": 0.0}  # 1 - 0.5 / 2
    rewards = position_rewards([["a"], ["b"], ["c"], ["d"]])
    assert rewards == pytest.approx({"a": 1.0, "b": 2 / 3, "c": 1 / 3, "d": 0.0})
    assert list(rewards) == ["a", "b", "c", "d"]  # best first


def test_no_information_gives_every_candidate_one_half():
    assert position_rewards([["a", "b", "c"]]) == {"a": 0.5, "b": 0.5, "c": 0.5}
    assert position_rewards([["a"]]) == {"a": 0.5}


def test_position_rewards_check_the_ranking():
    with pytest.raises(RankingError, match="candidate a appears twice"):
        position_rewards([["a"], ["a", "b"]])


def test_rating_reward_maps_the_scale_onto_0_to_1():
    assert [rating_reward(r) for r in (1, 2, 3)] == [0.0, 0.5, 1.0]
    assert rating_reward(2.5) == 0.75
    assert rating_reward(7, low=0, high=10) == pytest.approx(0.7)
    assert rating_reward(0, low=0, high=10) == 0.0 and rating_reward(10, low=0, high=10) == 1.0


@pytest.mark.parametrize("rating, scale, message", [
    (4, {}, "rating 4 is outside the scale 1-3"),
    (0.5, {}, "rating 0.5 is outside the scale 1-3"),
    (11, {"low": 0, "high": 10}, "rating 11 is outside the scale 0-10"),
    (math.nan, {}, "rating nan is not a finite number (the scale is 1-3)"),
    (math.inf, {"low": 0, "high": 10}, "rating inf is not a finite number (the scale is 0-10)"),
    ("2", {}, "rating '2' is not a finite number (the scale is 1-3)"),
    (2, {"low": 3, "high": 1}, "the rating scale 3-1 is empty: high must be above low"),
])
def test_bad_ratings_name_the_value_and_the_scale(rating, scale, message):
    with pytest.raises(ValueError) as caught:
        rating_reward(rating, **scale)
    assert str(caught.value) == message


def test_ranked_pairs_cross_tiers_in_ranking_order_and_skip_ties():
    assert ranked_pairs([["a"], ["b", "c"], ["d"]]) == [("a", "b"), ("a", "c"), ("a", "d"), ("b", "d"), ("c", "d")]
    assert ranked_pairs([[2], [0], [1]]) == [(2, 0), (2, 1), (0, 1)]
    assert ranked_pairs([["a", "b", "c"]]) == []
    assert ranked_pairs([["a"]]) == []
    assert len(ranked_pairs([[c] for c in "abcdefg"])) == 21  # k(k-1)/2 without ties


def test_level_weight_is_the_level():
    assert [level_weight(level) for level in (1, 2, 3)] == [1.0, 2.0, 3.0]
    assert level_weight(2.0) == 2.0


@pytest.mark.parametrize("level", [0, 4, 2.5, math.nan, "2", None])
def test_other_levels_are_refused(level):
    with pytest.raises(ValueError) as caught:
        level_weight(level)
    assert str(caught.value) == f"expert level {level!r} is not 1, 2 or 3"


def test_two_experts_combine_by_level():
    senior = ([["a"], ["b", "c"], ["d"]], 3)  # a 1, b 1/2, c 1/2, d 0
    junior = ([["d"], ["c"], ["b"], ["a"]], 1)  # d 1, c 2/3, b 1/3, a 0
    combined = combined_rewards([senior, junior])
    assert combined == pytest.approx({
        "a": (3 * 1 + 1 * 0) / 4,  # 0.75
        "b": (3 * 0.5 + 1 / 3) / 4,  # 11/24
        "c": (3 * 0.5 + 2 / 3) / 4,  # 13/24
        "d": (3 * 0 + 1 * 1) / 4,  # 0.25
    })
    assert list(combined) == ["a", "b", "c", "d"]


def test_combined_rewards_average_only_over_the_rankings_that_cover_a_candidate():
    senior = ([["a"], ["b", "c"], ["d"]], 3)
    partial = ([["d"], ["a"]], 1)  # d 1, a 0; says nothing of b and c
    assert combined_rewards([senior, partial]) == {"a": 0.75, "b": 0.5, "c": 0.5, "d": 0.25}
    assert combined_rewards([senior]) == position_rewards(senior[0])
    assert combined_rewards([]) == {}


def test_combined_rewards_refuse_a_bad_level():
    with pytest.raises(ValueError, match="expert level 5 is not 1, 2 or 3"):
        combined_rewards([([["a"], ["b"]], 5)])


def test_weighted_pairs_keep_each_experts_pairs_with_their_weight():
    senior = ([["a"], ["b", "c"]], 3)
    junior = ([["b"], ["a"], ["c"]], 1)  # agrees on (a, c), contradicts (a, b)
    assert weighted_pairs([senior, junior]) == [
        ("a", "b", 3.0), ("a", "c", 3.0),
        ("b", "a", 1.0), ("b", "c", 1.0), ("a", "c", 1.0),
    ]
    assert weighted_pairs([([["a", "b"]], 2)]) == []
    assert weighted_pairs([]) == []
    with pytest.raises(ValueError, match="expert level 0 is not 1, 2 or 3"):
        weighted_pairs([([["a", "b"]], 0)])  # no pairs, but the level is still wrong
