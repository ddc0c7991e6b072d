"""How much experts agree: Kendall's tau-b between two rankings of the same group.

tau-b, not tau-a, because experts tie candidates they cannot tell apart: tau-b counts concordant
minus discordant pairs and divides by the geometric mean of the pairs each ranking leaves untied,
so two identical rankings with ties still score 1. A ranking that ties everything orders no pair
and has no tau; it is reported as undefined, not as 0.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict


def tier_positions(tiers: list[list[str]]) -> dict[str, int]:
    """Candidate id -> its tier's index (0 = best); tied candidates share an index."""
    return {candidate: k for k, tier in enumerate(tiers) for candidate in tier}


def kendall_tau_b(tiers_a: list[list[str]], tiers_b: list[list[str]]) -> float | None:
    """tau-b over the candidates both rankings hold; None when either ranking orders no pair."""
    a, b = tier_positions(tiers_a), tier_positions(tiers_b)
    shared = sorted(a.keys() & b.keys())
    concordant = discordant = untied_a = untied_b = 0
    for x, y in itertools.combinations(shared, 2):
        da, db = a[x] - a[y], b[x] - b[y]
        untied_a += da != 0
        untied_b += db != 0
        concordant += da * db > 0
        discordant += da * db < 0
    if untied_a == 0 or untied_b == 0:
        return None
    return (concordant - discordant) / math.sqrt(untied_a * untied_b)


def agreement(rankings: list[dict]) -> list[dict]:
    """Mean tau-b for every pair of experts over the groups both ranked (skips left out).

    ``rankings`` are the store's rows (``group_id``, ``expert``, ``tiers``, ``skipped``). Returns one
    row per pair that shares a group: the two experts, how many groups they share, how many of those
    had a defined tau, and the mean tau (None when none had).
    """
    by_group: dict[str, dict[str, list]] = defaultdict(dict)
    for r in rankings:
        if not r["skipped"]:
            by_group[r["group_id"]][r["expert"]] = r["tiers"]
    taus: dict[tuple[str, str], list[float | None]] = defaultdict(list)
    for experts in by_group.values():
        for first, second in itertools.combinations(sorted(experts), 2):
            taus[first, second].append(kendall_tau_b(experts[first], experts[second]))
    rows = []
    for (first, second), values in sorted(taus.items()):
        defined = [t for t in values if t is not None]
        rows.append({"expert_a": first, "expert_b": second, "groups": len(values), "defined": len(defined),
                     "tau_b": sum(defined) / len(defined) if defined else None})
    return rows
