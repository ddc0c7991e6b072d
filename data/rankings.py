"""A ranking, and the one check of its shape and its candidate ids.

A ranking is a list of tiers, best first; a tier is a list of candidate ids (strings or integers)
that the expert could not tell apart, e.g. ``[["c2"], ["c0", "c3"], ["c1"]]``.

A ranking must cover exactly its group's candidates when they are given. A candidate left out
would silently drop out of the group's rewards and pairs; an expert who cannot place one ties it
with its neighbours instead, which says so.

``ranking_faults`` finds what is wrong with a ranking (ids repeated, unknown or left out);
``validate_ranking`` words it for experts and trainers (``optim.preference.rewards`` and the control room use
it), and the store words it for a submission to a stored group (``data.store``).
"""

from __future__ import annotations

import numbers
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

CandidateId = str | int
Tiers = list[list[CandidateId]]  # as validate_ranking returns them
Ranking = Sequence[Sequence[CandidateId]]  # as given: lists or tuples


class RankingError(ValueError):
    """A ranking that cannot be used as given; the message names the offending ids."""


@dataclass(frozen=True)
class RankingFaults:
    """What is wrong with a ranking's ids; empty (false) when nothing is."""

    repeated: dict[CandidateId, int]  # ids ranked more than once -> how many times, in first-appearance order
    unknown: list[CandidateId]  # ids ranked that are not among the candidates, each once
    missing: list[CandidateId]  # candidates the ranking leaves out

    def __bool__(self) -> bool:
        return bool(self.repeated or self.unknown or self.missing)


def normalise_tiers(tiers: Ranking) -> Tiers:
    """The ranking as a list of non-empty lists of ids; a ``RankingError`` naming the tier when it is not one.

    Integer ids (numpy's included) come back as plain ``int``.
    """
    if not isinstance(tiers, (list, tuple)):
        raise RankingError(f"a ranking is a list of tiers, not {tiers!r}")
    if not tiers:
        raise RankingError("the ranking is empty")
    normalised = []
    for number, tier in enumerate(tiers, start=1):  # counted from 1, as the expert sees them
        if not isinstance(tier, (list, tuple)):  # a bare "c1" would otherwise read as the ids "c", "1"
            raise RankingError(f"tier {number} of the ranking is {tier!r}, not a list of candidate ids")
        if not tier:
            raise RankingError(f"tier {number} of the ranking is empty")
        normalised.append([candidate_id(c, number) for c in tier])
    return normalised


def ranking_faults(tiers: Tiers, candidates: Sequence[CandidateId] | None = None) -> RankingFaults:
    """The ids of ``tiers`` (as ``normalise_tiers`` returns them) ranked twice or more; with ``candidates``,
    also those that are not candidates and the candidates left out."""
    ranked = [c for tier in tiers for c in tier]
    repeated = {c: n for c, n in Counter(ranked).items() if n > 1}
    if candidates is None:
        return RankingFaults(repeated, [], [])
    return RankingFaults(repeated, [c for c in dict.fromkeys(ranked) if c not in candidates],
                         [c for c in candidates if c not in ranked])


def validate_ranking(tiers: Ranking, candidates: Iterable[CandidateId] | None = None) -> Tiers:
    """The ranking as a list of lists of ids, after checking it; raises ``RankingError`` with every fault.

    Without ``candidates`` the ranking defines its group; with them it must rank each exactly once.
    Integer ids (numpy's included) come back as plain ``int``.
    """
    normalised = normalise_tiers(tiers)
    group = None if candidates is None else [candidate_id(c) for c in candidates]
    found = ranking_faults(normalised, group)
    faults = [f"candidate {c} appears {'twice' if n == 2 else f'{n} times'} in the ranking"
              for c, n in found.repeated.items()]
    if found.unknown:
        faults.append(f"ranking names unknown candidates: {_ids(found.unknown)} (this group has {_ids(group)})")
    if found.missing:
        hint = "rank every one; tie those you cannot tell apart"
        faults.append(f"ranking leaves out candidates: {_ids(found.missing)} ({hint})")
    if faults:
        raise RankingError("; ".join(faults))
    return normalised


def candidate_id(candidate, tier: int | None = None) -> CandidateId:
    """A string or an integer id (numpy integers become ``int``); anything else is a ``RankingError``."""
    if isinstance(candidate, str):
        return candidate
    if isinstance(candidate, numbers.Integral) and not isinstance(candidate, bool):
        return int(candidate)
    where = f"tier {tier} of the ranking" if tier else "the group's candidates"
    raise RankingError(f"{where} holds {candidate!r}, which is not a candidate id (a string or an integer)")


def _ids(candidates: Iterable[CandidateId]) -> str:
    return ", ".join(str(c) for c in candidates)
