"""Blind A/B verification: the Wilson interval by hand, the hidden sides, one judgement per pair,
results that survive a restart, and the ``ab`` export with pseudonyms."""

from types import SimpleNamespace

import datasets
import numpy as np
import pytest
from gradio_client import Client
from PIL import Image

from data.export import pseudonym
from data.phantoms import all_prompts
from data.store import NewCandidate, Store, StoreError
from optim.verification import NO_MODALITY, summarize, tally, wilson_interval
from tests.conftest import PROMPT, nudged_version
from workbench import ControlRoom, RoomConfig
from workbench.api import RoomAPI
from workbench.auth import Users, add_user
from workbench.ui import ab_table, serve
from workbench.verification import pair_versions

CONFIG = RoomConfig(steps=4)


# ---------------------------------------------------------------------- the numbers


def test_wilson_interval_by_hand():
    # z = 1.96, z^2 = 3.8416. 8 of 10: p = 0.8, scale 1 + 0.38416 = 1.38416, centre (0.8 + 0.19208) / 1.38416 = 0.716738,
    # half 1.96 * sqrt(0.016 + 0.009604) / 1.38416 = 0.226581
    assert wilson_interval(8, 10) == pytest.approx((0.49016, 0.94332), abs=1e-5)
    # 10 of 10: centre 1.19208 / 1.38416, half 1.96 * sqrt(0.009604) / 1.38416 = 0.19208 / 1.38416: (1 / 1.38416, 1)
    assert wilson_interval(10, 10) == pytest.approx((0.72246, 1.0), abs=1e-5)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.27754), abs=1e-5)
    # 5 of 10: symmetric about 0.5, half 1.96 * sqrt(0.025 + 0.009604) / 1.38416 = 0.26341
    assert wilson_interval(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-5)
    # 1 of 1: scale 4.8416, centre (1 + 1.9208) / 4.8416 = 0.60327, half 1.96 * sqrt(0.9604) / 4.8416 = 0.39673
    assert wilson_interval(1, 1) == pytest.approx((0.20654, 1.0), abs=1e-5)
    with pytest.raises(ValueError, match="n must be at least 1"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match="wins must lie between 0 and n = 3"):
        wilson_interval(4, 3)


def test_same_counts_as_half_a_win_per_expert_and_overall():
    # b, same, a, b: 2 wins + 1 half = 2.5 of 4 = 0.625. z^2 / n = 0.9604, scale 1.9604,
    # centre (0.625 + 0.4802) / 1.9604 = 0.56376, half 1.96 * sqrt(0.05859375 + 0.060025) / 1.9604 = 0.34434
    counts = tally(["b", "same", "a", "b"])
    assert {k: counts[k] for k in ("wins", "same", "losses", "n", "win_rate")} == {
        "wins": 2, "same": 1, "losses": 1, "n": 4, "win_rate": 0.625}
    assert (counts["low"], counts["high"]) == pytest.approx((0.21942, 0.90810), abs=1e-5)
    assert tally(["same"] * 3)["win_rate"] == 0.5  # cannot tell them apart: no change
    assert tally([])["n"] == 0 and tally([])["win_rate"] is None
    with pytest.raises(ValueError, match="verdicts are"):
        tally(["left"])

    ct, mri = "CT: axial slice of the abdomen", "MRI: axial slice of the brain"
    judged = [{"version_a": "v0", "version_b": "v1", "expert": "ann", "verdict": "b", "prompt": ct},
              {"version_a": "v1", "version_b": "v2", "expert": "ann", "verdict": "a", "prompt": "a brain, no prefix"},
              {"version_a": "v0", "version_b": "v1", "expert": "bob", "verdict": "same", "prompt": mri},
              {"version_a": "v0", "version_b": "v1", "expert": "ann", "verdict": "b", "prompt": mri}]
    first, second = summarize(judged)
    assert (first["version_a"], first["version_b"], second["version_a"]) == ("v0", "v1", "v1")
    assert first["overall"]["n"] == 3 and first["overall"]["win_rate"] == pytest.approx(2.5 / 3)
    assert {name: t["win_rate"] for name, t in first["per_expert"].items()} == {"ann": 1.0, "bob": 0.5}
    # per modality, every expert's judgements together: the MRIs' "same" shows where the overall 83% hides it
    assert {name: (t["n"], t["win_rate"]) for name, t in first["per_modality"].items()} == {"CT": (1, 1.0), "MRI": (2, 0.75)}
    assert second["overall"]["losses"] == 1 and second["overall"]["win_rate"] == 0.0
    assert list(second["per_modality"]) == [NO_MODALITY]

    table = ab_table([first, second])  # the Verify tab: each modality only where a pair has several
    assert table[["versions", "expert", "modality", "judgements"]].values.tolist() == [
        ["v0 → v1", "all experts", "all", 3], ["v0 → v1", "all experts", "CT", 1], ["v0 → v1", "all experts", "MRI", 2],
        ["v0 → v1", "ann", "all", 2], ["v0 → v1", "bob", "all", 1], ["v1 → v2", "all experts", "all", 1],
        ["v1 → v2", "ann", "all", 1]]
    assert table["win-rate of newer"].tolist()[:3] == [0.833, 1.0, 0.75] and table["95% interval"][2] == "0.198 – 0.973"  # 1.5 of 2


def test_the_versions_compared_default_to_the_current_one_and_its_parent_older_first():
    versions = [{"id": "v0", "parent": None}, {"id": "v1", "parent": "v0"}, {"id": "v2", "parent": "v1"}]
    assert pair_versions(versions, "v2") == ("v1", "v2")
    assert pair_versions(versions, "v2", "v2", "v0") == ("v0", "v2")  # stored older first, whatever the order asked
    assert pair_versions(versions, "v1", version_b="v2") == ("v1", "v2")
    with pytest.raises(ValueError, match="not v1 with itself"):
        pair_versions(versions, "v2", "v1", "v1")
    with pytest.raises(ValueError, match="v0 has no parent to compare with"):
        pair_versions(versions, "v0")
    with pytest.raises(ValueError, match="unknown versions v7; known: v0, v1, v2"):
        pair_versions(versions, "v2", "v7")


# ---------------------------------------------------------------------- the store


def test_a_judgement_names_the_winning_version_not_the_side_and_is_taken_once(tmp_path, store_url):
    store = Store(tmp_path, store_url)
    store.add_expert("ann", level=2)
    store.add_expert("bob")
    store.record_version("v0", None, None)
    store.record_version("v1", "v0", "dpo")
    b_on_left = store.add_ab_pair("ann", PROMPT, 7, "v0", "v1", left="b")
    a_on_left = store.add_ab_pair("ann", PROMPT, 8, "v0", "v1", left="a")
    judged = store.judge_ab_pair(b_on_left, "ann", "left", seconds=2.5)
    assert (judged["verdict"], judged["left"], judged["level"], judged["seed"], judged["seconds"]) == ("b", "b", 2, 7, 2.5)
    assert store.judge_ab_pair(a_on_left, "ann", "left")["verdict"] == "a"

    with pytest.raises(StoreError, match=f"A/B pair {b_on_left} is already judged"):
        store.judge_ab_pair(b_on_left, "ann", "right")
    with pytest.raises(StoreError, match="unknown A/B pair 'made-up': judge a pair the server showed you"):
        store.judge_ab_pair("made-up", "ann", "left")
    third = store.add_ab_pair("ann", PROMPT, 9, "v0", "v1", left="a")
    with pytest.raises(StoreError, match=f"A/B pair {third} was shown to another expert, not to 'bob'"):
        store.judge_ab_pair(third, "bob", "left")
    with pytest.raises(StoreError, match="choice must be one of"):
        store.judge_ab_pair(third, "ann", "a")
    assert store.judge_ab_pair(third, "ann", "right")["verdict"] == "b"  # a on the left, so right is b
    with pytest.raises(StoreError, match="compares two different versions"):
        store.add_ab_pair("ann", PROMPT, 1, "v1", "v1", left="a")
    with pytest.raises(StoreError, match="unrecorded versions: v5"):
        store.add_ab_pair("ann", PROMPT, 1, "v0", "v5", left="a")
    assert [j["verdict"] for j in store.ab_judgements()] == ["b", "a", "b"]
    assert store.ab_judgements(expert="bob") == []
    store.close()


def test_recent_ranked_prompts_are_newest_first_each_once_skips_aside(tmp_path, store_url):
    store = Store(tmp_path, store_url)
    store.add_expert("ann")
    assert store.recent_ranked_prompts() == []
    for prompt in ("CT: one", "MRI: two", "CT: one", "OCT: skipped"):
        group = store.add_group(prompt, "v0", [0], {}, [NewCandidate(b"png", True, 0)], wanted_rankings=2)
        store.add_ranking(group, "ann", None if "skipped" in prompt else [[f"{group}-c0"]], skipped="skipped" in prompt)
    assert store.recent_ranked_prompts() == ["CT: one", "MRI: two"]
    assert store.recent_ranked_prompts(limit=1) == ["CT: one"]
    store.close()


# ---------------------------------------------------------------------- the room


@pytest.fixture(scope="module")
def room(tmp_path_factory):
    """A room with v0 and v1 (v0's adapters nudged)."""
    room = ControlRoom(workdir=tmp_path_factory.mktemp("verify"), config=CONFIG)
    assert room.ab_results() == []
    with pytest.raises(ValueError, match="v0 has no parent to compare with: apply an update first"):
        room.ab_pair("ann")
    assert nudged_version(room) == "v1"
    return room


def test_a_pair_shows_both_versions_on_the_same_prompt_and_seed_on_hidden_sides(room):
    pair = room.ab_pair("ann", seed=11)
    assert pair.prompt in all_prompts()  # nobody has ranked yet: any prompt of the generator's vocabulary
    assert set(vars(pair)) == {"id", "prompt", "left", "right"}  # no version names
    judged = room.ab_judge(pair.id, "ann", "left")
    assert (judged["version_a"], judged["version_b"], judged["seed"]) == ("v0", "v1", 11)
    shown = {"a": judged["version_a"], "b": judged["version_b"]}
    left_version = shown[judged["left"]]
    right_version = shown["b" if judged["left"] == "a" else "a"]
    assert judged["verdict"] == judged["left"]  # "left" won: the version on the left
    for image, version in ((pair.left, left_version), (pair.right, right_version)):
        drawn = room.sample(pair.prompt, n=1, seed=11, version=version)[0]
        assert np.array_equal(np.asarray(image), np.asarray(drawn))
    assert not np.array_equal(np.asarray(pair.left), np.asarray(pair.right))  # v1 moved the image

    with pytest.raises(ValueError, match="not v1 with itself"):
        room.ab_pair("ann", "v1", "v1")
    with pytest.raises(StoreError, match="already judged"):
        room.ab_judge(pair.id, "ann", "right")


def test_an_expert_sees_only_their_own_row_an_admin_sees_everyone(room, tmp_path):
    add_user(tmp_path / "users.yaml", "ann", "ann-password", role="admin", level=3)
    add_user(tmp_path / "users.yaml", "cyd", "cyd-password", role="expert", level=1)
    api = RoomAPI(room, Users(tmp_path / "users.yaml"))
    cyd = api.caller(SimpleNamespace(username="cyd"))
    pair = api.ab_pair(cyd, prompt=PROMPT)
    assert api.ab_judge(cyd, pair.id, "same", seconds=1.5) == {"pair_id": pair.id, "stored": True}  # no verdict
    mine = api.ab_results(cyd)[0]
    assert set(mine["per_expert"]) == {"cyd"} and mine["overall"]["n"] >= 2
    everyone = api.ab_results(api.caller(SimpleNamespace(username="ann")))[0]
    assert {"ann", "cyd"} <= set(everyone["per_expert"])
    assert room.store.ab_judgements(expert="cyd")[0]["level"] == 1


def test_over_http_a_pair_names_no_version_and_takes_one_judgement(room):
    page = serve(RoomAPI(room), block=False)  # local mode: the caller names themselves
    try:
        local = Client(page.local_url, verbose=False)
        with pytest.raises(Exception, match="type your name first: judgements are stored under it"):
            local.predict(api_name="/ab_pair")
        pair = local.predict(prompt=PROMPT, seed=5, expert="dan", api_name="/ab_pair")
        assert set(pair) == {"pair_id", "prompt", "left", "right"} and pair["prompt"] == PROMPT
        assert Image.open(pair["left"]).size == Image.open(pair["right"]).size == (64, 64)
        assert "v0" not in pair["left"] + pair["right"] and "v1" not in pair["left"] + pair["right"]
        with pytest.raises(Exception, match="choice must be one of"):
            local.predict(pair_id=pair["pair_id"], choice="up", expert="dan", api_name="/ab_judge")
        assert local.predict(pair_id=pair["pair_id"], choice="right", expert="dan", api_name="/ab_judge")["stored"]
        with pytest.raises(Exception, match="is already judged"):
            local.predict(pair_id=pair["pair_id"], choice="left", expert="dan", api_name="/ab_judge")
        dan = local.predict(api_name="/ab_results")[0]["per_expert"]["dan"]
        assert (dan["n"], dan["same"]) == (1, 0) and dan["wins"] + dan["losses"] == 1
    finally:
        page.close()


def test_results_survive_a_restart_and_the_ab_export_holds_pseudonyms(room, tmp_path):
    for choice in ("right", "same"):
        room.ab_judge(room.ab_pair("Dr Bea Smith", prompt=all_prompts()[3]).id, "Dr Bea Smith", choice, seconds=3.0)
    before = room.ab_results()
    bea = before[0]["per_expert"]["Dr Bea Smith"]
    assert (bea["n"], bea["same"], bea["wins"] + bea["losses"]) == (2, 1, 1)
    room.store.close()

    again = ControlRoom(workdir=room.workdir, config=CONFIG)
    assert again.ab_results() == before
    judgements = again.store.ab_judgements()
    path = again.export("ab", tmp_path / "ab.parquet")
    rows = datasets.load_dataset("parquet", data_files=str(path), split="train", cache_dir=str(tmp_path / "cache"))
    assert len(rows) == len(judgements) == before[0]["overall"]["n"]
    secret = (room.workdir / "export.secret").read_text().strip()
    assert rows["user_id"] == [pseudonym(j["expert"], secret) for j in judgements]
    assert rows["verdict"] == [j["verdict"] for j in judgements]
    assert rows["left"] == [j["version_a"] if j["left"] == "a" else j["version_b"] for j in judgements]
    assert set(rows["version_a"]) == {"v0"} and set(rows["version_b"]) == {"v1"}
    assert rows["prompt"][-1] == all_prompts()[3] and rows["seconds"][-1] == 3.0
    assert b"Bea Smith" not in path.read_bytes()
