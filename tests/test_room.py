"""The control room end to end in Python: generate, rank, losses, update, sample, versions, rollback, export, restart."""

import math

import datasets
import numpy as np
import pytest

from optim.rewards import RankingError
from workbench import ControlRoom, RoomConfig
from tests.conftest import PROMPT

CONFIG = RoomConfig(survivors=3, batch_size=3, max_draws=6, steps=4)


def pixels(images):
    return np.stack([np.asarray(image, dtype=np.float32) for image in images])


def test_a_round_from_generate_to_export_and_a_restart_that_loses_nothing(tmp_path):
    room = ControlRoom(workdir=tmp_path, config=CONFIG)
    group = room.generate(PROMPT, seed=1)
    assert group.version == "v0" and len(group.survivors) == 3 and group.message.startswith("3 of 3 candidates passed")
    a, b, c = (s.id for s in group.survivors)
    with pytest.raises(RankingError, match="unknown candidates: nope"):
        room.rank(group.id, [[a], [b, c, "nope"]], expert="alice")
    room.rank(group.id, [[c], [a, b]], expert="alice", ratings={c: 3, a: 2, b: 1}, seconds=4.2)

    numbers = room.losses(group.id)
    assert [x["ratio"] for x in numbers["grpo"]["candidates"]] == [1.0, 1.0, 1.0]
    assert numbers["dpo"]["loss"] == pytest.approx(math.log(2)) and len(numbers["dpo"]["pairs"]) == 2

    result = room.apply_update(algorithm="dpo", who="alice")
    assert result.applied and result.version.id == "v1", result.message
    assert [v["id"] for v in room.versions() if v["current"]] == ["v1"]
    assert room.store.updates()[-1]["applied"] and room.store.unused_ranked_groups() == []
    with pytest.raises(ValueError, match="no ranked groups to learn from yet"):
        room.apply_update()

    new, base = room.sample(PROMPT, n=2, seed=9, version="v1"), room.sample(PROMPT, n=2, seed=9, version="v0")
    assert np.abs(pixels(new) - pixels(base)).max() > 0  # the update changed the images
    assert room.policy.version == "v1"  # sampling another version leaves the current one in place

    parquet = room.export("pickapic", tmp_path / "out" / "prefs.parquet")
    rows = datasets.load_dataset("parquet", data_files=str(parquet), split="train")
    # jpg_0 is the candidate drawn first: c (drawn last) won both decided pairs, and a/b is a tie
    assert len(rows) == 3 and sorted(zip(rows["label_0"], rows["label_1"])) == [(0.0, 1.0), (0.0, 1.0), (0.5, 0.5)]

    room.rollback("v0")
    assert [v["id"] for v in room.versions() if v["current"]] == ["v0"]
    pending = room.generate(PROMPT, seed=2)
    room.store.close()

    again = ControlRoom(workdir=tmp_path, config=CONFIG)
    assert again.policy.version == "v0" and again.store.get_group(pending.id)["status"] == "pending"
    assert [r["tiers"] for r in again.store.rankings(group.id)] == [[[c], [a, b]]]
    # back on the weights that drew the group: its stored chains re-score to a ratio of exactly 1 again
    assert [x["ratio"] for x in again.losses(group.id)["grpo"]["candidates"]] == [1.0, 1.0, 1.0]


def test_a_group_with_no_survivor_is_stored_and_says_why(tmp_path):
    room = ControlRoom(workdir=tmp_path, config=CONFIG)
    room.sampler.selector.config.quality_threshold = 1.01  # nothing can pass
    group = room.generate(PROMPT, seed=3)
    assert group.survivors == [] and len(group.rejected) == 6
    assert group.message.startswith("only 0 of the 3 wanted candidates passed the selector: the budget of 6 draws is spent")
    assert all(r.reasons[-1].endswith("below 1.01") for r in group.rejected)
    with pytest.raises(ValueError, match=f"group {group.id} has no candidate that passed the selector"):
        room.losses(group.id)
