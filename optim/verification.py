"""Blind A/B verification in numbers: how often the newer version wins, with a 95% Wilson interval.

An expert is shown one image from each of two versions (same prompt, same seed, sides hidden) and
picks the better one or "same". A judgement's verdict names the winning VERSION of the pair:
"a" is the older version, "b" the newer, "same" neither.

- The win-rate of the newer version counts "same" as half a win: ``(wins + same / 2) / n``, with
  ``n`` every judgement. Dropping the "same" answers instead would turn "cannot tell them apart"
  into no evidence at all and make a version that changes nothing look as good as one that helps
  half the time; as half a win, a pair judged all "same" sits at 0.5, where no change belongs.
- The interval is Wilson's score interval (Wilson 1927; Brown, Cai and DasGupta 2001), which stays
  inside [0, 1] and keeps a sensible width at small n and at rates near 0 or 1, where the normal
  approximation collapses (10 of 10 would give [1, 1]). With half wins the count is not an
  integer; the formula takes the rate as it is.

- Each version pair is tallied overall, per expert and per modality (read from the prompt's prefix):
  an update can make one modality better and another worse (on the learning benchmark, GRPO lifted
  the CTs' contrast and lowered the brain MRIs'), and an overall win-rate of 85% hides which.

Pure functions over plain dicts: no model, no store.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

from data.modalities import modality_of_prompt

Z_95 = 1.96  # the normal quantile for a two-sided 95% interval
VERDICTS = ("a", "b", "same")  # older won, newer won, no difference
NO_MODALITY = "no modality"  # a prompt without a modality prefix (``CT: ...``)


def wilson_interval(wins: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a rate of ``wins`` in ``n`` trials (half wins allowed).

    ``(p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)`` with ``p = wins / n``;
    8 of 10 gives (0.490, 0.943).
    """
    if n < 1:
        raise ValueError(f"n must be at least 1 judgement, not {n}")
    if not 0 <= wins <= n:
        raise ValueError(f"wins must lie between 0 and n = {n}, not {wins}")
    p, z2 = wins / n, z * z
    centre = p + z2 / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    scale = 1 + z2 / n
    return max(0.0, (centre - half) / scale), min(1.0, (centre + half) / scale)


def tally(verdicts: Iterable[str], z: float = Z_95) -> dict:
    """Counts of one set of judgements and the newer version's win-rate with its Wilson interval.

    ``wins``: the newer version ("b") won; ``losses``: the older ("a") won; ``same``: no difference.
    """
    verdicts = list(verdicts)
    if unknown := sorted({v for v in verdicts if v not in VERDICTS}):
        raise ValueError(f"verdicts are {VERDICTS}, not {', '.join(map(repr, unknown))}")
    wins, same, losses = (verdicts.count(v) for v in ("b", "same", "a"))
    n = len(verdicts)
    if n == 0:
        return {"wins": 0, "same": 0, "losses": 0, "n": 0, "win_rate": None, "low": None, "high": None}
    low, high = wilson_interval(wins + same / 2, n, z)
    return {"wins": wins, "same": same, "losses": losses, "n": n, "win_rate": (wins + same / 2) / n,
            "low": low, "high": high}


def summarize(judgements: Iterable[dict], z: float = Z_95) -> list[dict]:
    """Per version pair (older ``version_a``, newer ``version_b``), in the order first judged: the
    ``overall`` tally, one per expert (``per_expert``, by name) and one per modality of the prompts
    judged (``per_modality``, by name; ``NO_MODALITY`` for a prompt without a modality prefix).

    Each judgement is a dict with ``version_a``, ``version_b``, ``verdict``, ``expert`` and ``prompt``.
    """
    pairs: dict[tuple[str, str], list[dict]] = {}
    for judgement in judgements:
        pairs.setdefault((judgement["version_a"], judgement["version_b"]), []).append(judgement)
    return [{"version_a": a, "version_b": b, "overall": tally([j["verdict"] for j in judged], z),
             "per_expert": tallies(judged, lambda j: j["expert"], z),
             "per_modality": tallies(judged, lambda j: modality_of_prompt(j["prompt"], known=None) or NO_MODALITY, z)}
            for (a, b), judged in pairs.items()]


def tallies(judgements: list[dict], key: Callable[[dict], str], z: float = Z_95) -> dict[str, dict]:
    """One tally per value of ``key(judgement)``, sorted by that value."""
    verdicts: dict[str, list[str]] = {}
    for judgement in judgements:
        verdicts.setdefault(key(judgement), []).append(judgement["verdict"])
    return {name: tally(found, z) for name, found in sorted(verdicts.items())}
