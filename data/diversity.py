"""How much a prompt's images differ from one another: the variety an expert loses when a generator collapses.

Preference optimisation can buy its reward with variety (every candidate of a prompt drifting toward the
same image), which an expert sees at once and no win-rate shows. The measure is the mean pairwise RMS
distance between the grey levels (in [0, 1]) of the images drawn for one prompt, over every pair of every
prompt. The learning benchmark reports it, base -> final; the control room reports it for every update on
its fixed-seed probe, and refuses an update whose probe loses too much of it when the admin sets
``workbench.room.RoomConfig.max_diversity_drop`` (off by default: the README says why).
"""

from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np


def grey_levels(image) -> np.ndarray:
    """The image as grey levels in [0, 1] (float32)."""
    return np.asarray(image.convert("L"), dtype=np.float32) / 255.0


def diversity(groups: Sequence[Sequence[np.ndarray]]) -> float:
    """Mean pairwise RMS distance between the grey images of each group (one prompt's images), over all pairs;
    groups of one image have no pair and add nothing. ``nan`` when no group has two images."""
    distances = [np.sqrt(np.mean((a - b) ** 2)) for group in groups for a, b in itertools.combinations(group, 2)]
    return float(np.mean(distances)) if distances else float("nan")


def diversity_change(base: float | None, trained: float | None) -> float | None:
    """``trained / base - 1``: the share of the base's variety gained (negative: lost); None without a base figure."""
    return trained / base - 1 if base else None
