"""Blind A/B verification: before rolling forward, experts confirm that the last update helped.

An expert is shown two images side by side, one from each of two versions, drawn for the same
prompt from the same seed, so the only difference is the weights. Which version is on which side
is drawn at random and stays in the store (``data.store.ABPair``): the page gets a pair id and two
images, never a version name. The expert answers "left", "right" or "same"; the store turns the
side into the winning version. ``optim.verification`` turns the judgements into win-rates with
Wilson intervals, per version pair, per expert and overall (``ControlRoom.ab_results``).

Defaults: the current version against its parent, a prompt the experts ranked recently (any
prompt of the default generator's vocabulary when nobody has ranked yet), a fresh seed.
"""

from __future__ import annotations

import random
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import Image

from data.phantoms import all_prompts

if TYPE_CHECKING:
    from workbench.room import ControlRoom

RECENT_PROMPTS = 20  # a pair's prompt is drawn from the prompts of this many latest ranked groups
SEEDS = 2**31  # fresh seeds are drawn below this


@dataclass
class BlindPair:
    """What the expert sees: no version names, no hint which side is which."""

    id: str
    prompt: str
    left: Image.Image
    right: Image.Image


def pair_versions(versions: list[dict], current: str, version_a: str | None = None,
                  version_b: str | None = None) -> tuple[str, str]:
    """The two versions to compare, older first; by default the current version and its parent.

    ``versions`` are the store's rows, oldest first. A missing ``version_b`` is the current
    version; a missing ``version_a`` is ``version_b``'s parent.
    """
    order = {v["id"]: k for k, v in enumerate(versions)}
    parents = {v["id"]: v["parent"] for v in versions}
    version_b = version_b or current
    version_a = version_a or parents.get(version_b)
    if unknown := [v for v in (version_a, version_b) if v is not None and v not in order]:
        raise ValueError(f"unknown versions {', '.join(unknown)}; known: {', '.join(order)}")
    if version_a is None:
        raise ValueError(f"{version_b} has no parent to compare with: apply an update first, or choose two versions")
    if version_a == version_b:
        raise ValueError(f"a blind pair compares two different versions, not {version_a} with itself")
    return tuple(sorted((version_a, version_b), key=order.__getitem__))


def draw_pair(room: ControlRoom, expert: str, version_a: str | None = None, version_b: str | None = None,
              prompt: str | None = None, seed: int | None = None) -> BlindPair:
    """Sample one image from each version (same prompt and seed), put them on random sides, and
    store the pair for ``expert`` (who must be known to the store) so that only it can be judged."""
    older, newer = pair_versions(room.store.versions(), room.policy.version, version_a, version_b)
    prompt = prompt or random.choice(room.store.recent_ranked_prompts(RECENT_PROMPTS) or all_prompts())
    seed = secrets.randbelow(SEEDS) if seed is None else int(seed)
    images = {side: room.sample(prompt, n=1, seed=seed, version=version)[0]
              for side, version in (("a", older), ("b", newer))}
    left = secrets.choice(("a", "b"))
    pair_id = room.store.add_ab_pair(expert, prompt, seed, older, newer, left)
    return BlindPair(pair_id, prompt, images[left], images["b" if left == "a" else "a"])

