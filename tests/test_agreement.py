"""Kendall tau-b between experts' rankings, against hand-worked values and scipy."""

import math

import pytest
from scipy.stats import kendalltau

from optim.preference.agreement import agreement, kendall_tau_b


def test_identical_and_reversed_rankings():
    assert kendall_tau_b([["a"], ["b"], ["c"]], [["a"], ["b"], ["c"]]) == 1.0
    assert kendall_tau_b([["a"], ["b"], ["c"]], [["c"], ["b"], ["a"]]) == -1.0


def test_a_tie_by_hand():
    # Pairs: (a,b) tied in the second ranking; (a,c) and (b,c) concordant.
    # tau_b = (2 - 0) / sqrt(3 * 2) = 0.8165
    assert kendall_tau_b([["a"], ["b"], ["c"]], [["a", "b"], ["c"]]) == pytest.approx(2 / math.sqrt(6))


def test_matches_scipy_with_ties_on_both_sides():
    first = [["a", "b"], ["c"], ["d", "e"]]
    second = [["b"], ["a", "c", "d"], ["e"]]
    ranks = lambda tiers: [next(k for k, t in enumerate(tiers) if c in t) for c in "abcde"]  # noqa: E731
    expected = kendalltau(ranks(first), ranks(second), variant="b").statistic
    assert kendall_tau_b(first, second) == pytest.approx(expected)


def test_a_ranking_that_ties_everything_has_no_tau():
    assert kendall_tau_b([["a", "b", "c"]], [["a"], ["b"], ["c"]]) is None


def test_agreement_per_pair_of_experts_over_shared_groups():
    rows = [
        {"group_id": "g1", "expert": "ann", "tiers": [["x"], ["y"]], "skipped": False},
        {"group_id": "g1", "expert": "bob", "tiers": [["y"], ["x"]], "skipped": False},
        {"group_id": "g2", "expert": "ann", "tiers": [["p"], ["q"], ["r"]], "skipped": False},
        {"group_id": "g2", "expert": "bob", "tiers": [["p"], ["q"], ["r"]], "skipped": False},
        {"group_id": "g2", "expert": "cy", "tiers": [], "skipped": True},
        {"group_id": "g3", "expert": "cy", "tiers": [["s"], ["t"]], "skipped": False},
    ]
    assert agreement(rows) == [{"expert_a": "ann", "expert_b": "bob", "groups": 2, "defined": 2, "tau_b": 0.0}]
