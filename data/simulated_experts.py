"""Simulated experts: documented preferences that rank images, for the learning benchmark and tests.

A simulated expert scores an image from its pixels alone (it knows nothing of seeds, versions or
log-probabilities) and ranks a group by that score, best first, tying candidates whose scores
differ by less than its ``tie`` from the previous one's. Each preference is one a radiologist
could plausibly state, and each is measured on the grey levels in [0, 1]:

==========  =================================================  =======
name        score                                               tie
==========  =================================================  =======
contrast    standard deviation of the grey levels               0.002
brightness  mean grey level                                     0.002
==========  =================================================  =======

Two preferences that pull in different directions are there so that nothing is tuned to one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from data.diversity import grey_levels


@dataclass(frozen=True)
class SimulatedExpert:
    name: str
    score: Callable  # PIL image -> float, higher is preferred
    tie: float

    def rank(self, ids: list, images: list) -> list[list]:
        """Tiers best first; a candidate within ``tie`` of the previous one's score shares its tier."""
        order = sorted(zip(ids, map(self.score, images)), key=lambda pair: -pair[1])
        tiers, last = [[order[0][0]]], order[0][1]
        for candidate, score in order[1:]:
            if last - score < self.tie:
                tiers[-1].append(candidate)
            else:
                tiers.append([candidate])
            last = score
        return tiers


EXPERTS = {
    "contrast": SimulatedExpert("contrast", lambda image: float(grey_levels(image).std()), 0.002),
    "brightness": SimulatedExpert("brightness", lambda image: float(grey_levels(image).mean()), 0.002),
}
