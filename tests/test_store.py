"""The store: groups and blobs round-trip, rankings are checked and never lost or doubled, a restart forgets nothing.

Every test that takes ``store`` or ``store_url`` runs on SQLite and on a real PostgreSQL server
(tests/conftest.py starts one per session; skipped with the reason where its binaries are missing).
"""

import hashlib
import json
import threading

import pytest
from sqlalchemy import event, text

from data.blobs import BlobError
from data.store import NewCandidate, Store, StoreError

PROMPT = "OCT: retinal layers with subretinal fluid"


@pytest.fixture
def store(tmp_path, store_url):
    store = Store(tmp_path / "work", store_url)
    yield store
    store.close()


def _group(store, wanted_rankings=1, prompt=PROMPT, tag=b"") -> str:
    """A group of three candidates: c0 and c1 pass the selector, c2 is rejected."""
    candidates = [
        NewCandidate(image=b"png-%d" % k + tag, passed=k < 2, seed=k, quality=0.9 - 0.3 * k,
                     modality={"OCT": 0.9, "CT": 0.1}, reasons=[] if k < 2 else ["quality 0.30 < 0.50"],
                     trajectory=b"chain-%d" % k + tag)
        for k in range(3)
    ]
    return store.add_group(prompt, "v0", seeds=[0, 1, 2], settings={"steps": 4}, candidates=candidates,
                           wanted_rankings=wanted_rankings)


def _experts(store, *names):
    for name in names:
        store.add_expert(name, level=2)


def test_group_round_trips_with_its_candidates_and_blobs(store):
    g = _group(store)
    group = store.get_group(g)
    assert {k: group[k] for k in ("id", "prompt", "version", "seeds", "settings")} == {
        "id": g, "prompt": PROMPT, "version": "v0", "seeds": [0, 1, 2], "settings": {"steps": 4}}
    assert (group["status"], group["ranked_by"], group["wanted_rankings"]) == ("pending", 0, 1)
    assert [c["id"] for c in group["candidates"]] == [f"{g}-c{k}" for k in range(3)]
    assert group["survivors"] == [f"{g}-c0", f"{g}-c1"]
    rejected = group["candidates"][2]
    assert (rejected["passed"], rejected["seed"], rejected["reasons"]) == (False, 2, ["quality 0.30 < 0.50"])
    assert rejected["modality"] == {"OCT": 0.9, "CT": 0.1} and rejected["quality"] == pytest.approx(0.3)
    assert store.blobs.get(rejected["image"]) == b"png-2" and store.blobs.get(rejected["trajectory"]) == b"chain-2"
    assert json.loads(json.dumps(group)) == group  # JSON-ready for the HTTP API
    with pytest.raises(StoreError, match="unknown group 'nope'"):
        store.get_group("nope")


def test_blobs_are_content_addressed_and_stored_once(store):
    digest = store.blobs.put(b"same bytes")
    assert digest == hashlib.sha256(b"same bytes").hexdigest()
    assert store.blobs.put(b"same bytes") == digest
    assert store.blobs.root.joinpath(digest[:2], digest[2:]).read_bytes() == b"same bytes"
    files = [p for p in store.blobs.root.rglob("*") if p.is_file()]
    assert len(files) == 1  # one file, no temp left behind


@pytest.mark.parametrize("digest", ["../../workbench.db", "AB" * 32, "a" * 63, "../" + "a" * 61, None])
def test_a_malformed_digest_is_refused(store, digest):
    with pytest.raises(BlobError, match="not a blob digest"):
        store.blobs.get(digest)


def test_a_missing_blob_is_named(store):
    with pytest.raises(BlobError, match="f" * 64):
        store.blobs.get("f" * 64)


def test_a_ranking_must_rank_exactly_the_survivors(store):
    _experts(store, "alice")
    g = _group(store)
    with pytest.raises(StoreError, match=f"unknown candidates {g}-c9"):
        store.add_ranking(g, "alice", [[f"{g}-c0"], [f"{g}-c1", f"{g}-c9"]])
    with pytest.raises(StoreError, match=f"rejected {g}-c2"):
        store.add_ranking(g, "alice", [[f"{g}-c0"], [f"{g}-c1", f"{g}-c2"]])
    with pytest.raises(StoreError, match=f"left out {g}-c1"):
        store.add_ranking(g, "alice", [[f"{g}-c0"]])
    with pytest.raises(StoreError, match="ratings are 1-3"):
        store.add_ranking(g, "alice", [[f"{g}-c0", f"{g}-c1"]], ratings={f"{g}-c0": 5})
    with pytest.raises(StoreError, match="unknown expert 'mallory'"):
        store.add_ranking(g, "mallory", [[f"{g}-c0", f"{g}-c1"]])
    with pytest.raises(StoreError, match="a skip carries no tiers"):
        store.add_ranking(g, "alice", [[f"{g}-c0", f"{g}-c1"]], skipped=True)
    with pytest.raises(StoreError, match="level must be one of"):
        store.add_ranking(g, "alice", [[f"{g}-c0", f"{g}-c1"]], level=4)
    assert store.rankings() == []

    ranking = store.add_ranking(g, "alice", [[f"{g}-c1"], [f"{g}-c0"]], ratings={f"{g}-c1": 3}, seconds=12.5)
    assert (ranking["expert"], ranking["level"], ranking["tiers"]) == ("alice", 2, [[f"{g}-c1"], [f"{g}-c0"]])
    assert store.rankings(group_id=g) == [ranking] == store.rankings(expert="alice")
    assert store.get_group(g)["status"] == "ranked"


def test_a_second_ranking_by_the_same_expert_is_refused(store):
    _experts(store, "alice")
    g = _group(store, wanted_rankings=2)
    store.add_ranking(g, "alice", [[f"{g}-c0"], [f"{g}-c1"]])
    with pytest.raises(StoreError, match=f"'alice' has already ranked group {g}"):
        store.add_ranking(g, "alice", [[f"{g}-c1"], [f"{g}-c0"]])
    with pytest.raises(StoreError, match="already ranked"):
        store.add_ranking(g, "alice", None, skipped=True)
    assert [r["tiers"] for r in store.rankings()] == [[[f"{g}-c0"], [f"{g}-c1"]]]


def test_a_restart_loses_nothing(tmp_path, store_url):
    store = Store(tmp_path / "work", store_url)
    _experts(store, "alice")
    pending, ranked = _group(store), _group(store, tag=b"2")
    store.add_ranking(ranked, "alice", [[f"{ranked}-c0", f"{ranked}-c1"]], seconds=3.0)
    before = (store.get_group(pending), store.get_group(ranked), store.rankings())
    store.close()

    reopened = Store(tmp_path / "work", store_url)
    assert (reopened.get_group(pending), reopened.get_group(ranked), reopened.rankings()) == before
    assert reopened.get_group(pending)["status"] == "pending"
    assert reopened.next_group_for("alice")["id"] == pending
    assert reopened.blobs.get(before[0]["candidates"][0]["image"]) == b"png-0"
    reopened.close()


def test_overlap_sends_a_group_to_two_experts_and_skips_do_not_count(store):
    _experts(store, "alice", "bob", "carol", "dave")
    shared, later = _group(store, wanted_rankings=2), _group(store, tag=b"later")
    assert store.next_group_for("alice")["id"] == shared
    store.add_ranking(shared, "alice", [[f"{shared}-c0"], [f"{shared}-c1"]])
    assert store.next_group_for("alice")["id"] == later  # alice never gets a group twice
    store.add_ranking(shared, "dave", None, skipped=True)  # a skip is dave's answer, not a ranking
    assert store.next_group_for("dave")["id"] == later
    assert store.next_group_for("bob")["id"] == shared  # one ranking of the two wanted
    store.add_ranking(shared, "bob", [[f"{shared}-c1"], [f"{shared}-c0"]])
    assert store.next_group_for("carol")["id"] == later  # the shared group has its two rankings
    assert store.get_group(shared)["status"] == "ranked"
    counts = store.counts()
    assert (counts["groups"], counts["ranked"], counts["pending"], counts["per_modality"]) == (2, 1, 1, {"OCT": 2})
    assert counts["per_expert"]["dave"] == {"rankings": 0, "skipped": 1}


def test_a_group_where_the_selector_passed_nothing_is_never_offered_nor_waiting(store):
    """Nothing to rank: offering it would leave every expert on an empty screen, and Next would bring it back."""
    _experts(store, "alice")
    rejected = [NewCandidate(image=b"blank-%d" % k, passed=False, seed=k, reasons=["blank image"]) for k in range(3)]
    empty = store.add_group(PROMPT, "v0", seeds=[0, 1, 2], settings={"steps": 4}, candidates=rejected)
    assert store.get_group(empty)["status"] == "empty"
    assert store.next_group_for("alice") is None
    waiting = _group(store)
    assert store.next_group_for("alice")["id"] == waiting
    counts = store.counts()
    assert (counts["groups"], counts["ranked"], counts["pending"], counts["empty"]) == (2, 0, 1, 1)
    assert store.unused_ranked_groups() == []  # and no update trains on it


def test_unused_ranked_groups_leave_out_those_an_applied_update_used(store):
    _experts(store, "alice")
    groups = [_group(store, tag=b"%d" % k) for k in range(4)]
    for g in groups[:3]:
        store.add_ranking(g, "alice", [[f"{g}-c0"], [f"{g}-c1"]])
    assert [g["id"] for g in store.unused_ranked_groups()] == groups[:3]  # the unranked one is not offered

    store.record_update("admin", "grpo", groups[:1], applied=False, message="NaN loss; kept v0")
    assert [g["id"] for g in store.unused_ranked_groups()] == groups[:3]  # a refused update used nothing
    store.record_version("v1", parent="v0", algorithm="grpo", metrics={"loss": 0.1})
    update = store.record_update("admin", "grpo", groups[:2], applied=True, version="v1", metrics={"loss": 0.1})
    assert [g["id"] for g in store.unused_ranked_groups()] == groups[2:3]
    assert store.updates()[-1]["id"] == update and store.updates()[-1]["groups"] == groups[:2]
    assert [v["id"] for v in store.versions()] == ["v1"]
    with pytest.raises(StoreError, match="unknown groups: nope"):
        store.record_update("admin", "dpo", ["nope"], applied=True)


def test_the_export_reads_every_ranked_group_in_a_fixed_number_of_queries(store):
    """``groups_with_rankings`` gives what reading each group and its rankings one by one gave, in three
    queries for one ranked group as for five."""
    _experts(store, "alice", "bob")
    statements = []
    event.listen(store.engine, "before_cursor_execute", lambda *args: statements.append(args[2]))

    def read() -> tuple[list[dict], int]:
        statements.clear()
        found = store.groups_with_rankings()
        return found, len(statements)

    def one_by_one() -> list[dict]:
        """What the export read before: each ranked group, then each group's rankings."""
        ids = sorted({r["group_id"] for r in store.rankings() if not r["skipped"]})
        return [{**store.get_group(g), "rankings": [r for r in store.rankings(g) if not r["skipped"]]} for g in ids]

    first = _group(store, wanted_rankings=2)
    store.add_ranking(first, "alice", [[f"{first}-c0"], [f"{first}-c1"]], ratings={f"{first}-c0": 3})
    _group(store, tag=b"pending")  # no ranking: not exported
    skipped = _group(store, tag=b"skipped")
    store.add_ranking(skipped, "alice", None, skipped=True)  # a skip alone: not exported
    one, queries_for_one = read()
    for k in range(4):
        g = _group(store, tag=b"%d" % k)
        store.add_ranking(g, "alice", [[f"{g}-c1"], [f"{g}-c0"]], seconds=2.0)
    store.add_ranking(first, "bob", [[f"{first}-c0", f"{first}-c1"]])
    store.add_ranking(skipped, "bob", [[f"{skipped}-c1"], [f"{skipped}-c0"]])
    many, queries_for_many = read()

    assert len(one) == 1 and len(many) == 6 and queries_for_one == queries_for_many <= 3
    expected = one_by_one()
    assert [g["id"] for g in many] == [g["id"] for g in expected]
    for got, old in zip(many, expected):
        assert got["passed_candidates"] == [c for c in old["candidates"] if c["passed"]]
        assert got["rankings"] == old["rankings"]
        assert {k: got[k] for k in ("prompt", "version", "created_at")} == {k: old[k] for k in ("prompt", "version", "created_at")}
    assert json.loads(json.dumps(many)) == many  # JSON-ready, like every other answer of the store


def test_a_ranking_is_one_insert_once_its_group_and_expert_are_known(store, tmp_path, store_url, monkeypatch):
    """A group's candidates and an expert's id never change once stored, so the store remembers them: an
    expert's ranking is its insert alone. Another store on the same database (another process) remembers
    nothing and reads them, and checks the ranking the same way; so does a store that forgot."""
    _experts(store, "alice")  # at a level, as a logged-in expert ranks
    g = _group(store, wanted_rankings=3)
    statements = []
    event.listen(store.engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    store.add_ranking(g, "alice", [[f"{g}-c0"], [f"{g}-c1"]], level=2)
    assert [q.split()[0] for q in statements] == ["INSERT"]

    other = Store(tmp_path / "work", store_url)
    try:
        with pytest.raises(StoreError, match=f"rejected {g}-c2"):
            other.add_ranking(g, "alice", [[f"{g}-c0", f"{g}-c1", f"{g}-c2"]], level=2)
        with pytest.raises(StoreError, match="unknown group 'nope'"):
            other.add_ranking("nope", "alice", [[f"{g}-c0"]], level=2)
        with pytest.raises(StoreError, match="unknown expert 'mallory'"):
            other.add_ranking(g, "mallory", [[f"{g}-c0", f"{g}-c1"]], level=2)
        other.add_expert("bob", level=3)
        assert other.add_ranking(g, "bob", [[f"{g}-c1", f"{g}-c0"]])["level"] == 3  # no level given: the expert's
    finally:
        other.close()

    monkeypatch.setattr("data.store.REMEMBERED_GROUPS", 1)
    h = _group(store, tag=b"next")  # the store forgets g's candidates to remember h's
    with pytest.raises(StoreError, match=f"left out {g}-c1"):
        store.add_ranking(g, "alice", [[f"{g}-c0"]], level=2)
    assert [r["expert"] for r in store.rankings(g)] == ["alice", "bob"] and store.rankings(h) == []


def test_twenty_experts_ranking_at_once_while_an_update_is_written(store):
    names = [f"expert{k:02d}" for k in range(20)]
    _experts(store, *names)
    groups = [_group(store, wanted_rankings=2, tag=b"%d" % k) for k in range(10)]
    start = threading.Barrier(21)
    errors = []

    def rank(name, g):
        start.wait()
        try:
            store.add_ranking(g, name, [[f"{g}-c0"], [f"{g}-c1"]], seconds=1.0)
        except Exception as error:  # noqa: BLE001 - collected and asserted below
            errors.append(error)

    def update():
        start.wait()
        store.record_version("v1", parent="v0", algorithm="dpo")
        store.record_update("admin", "dpo", groups[:5], applied=True, version="v1")

    threads = [threading.Thread(target=rank, args=(n, groups[k // 2])) for k, n in enumerate(names)]
    threads.append(threading.Thread(target=update))
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert errors == []
    stored = store.rankings()
    assert len(stored) == 20 and sorted(r["expert"] for r in stored) == names
    assert all(store.get_group(g)["status"] == "ranked" for g in groups)
    assert [g["id"] for g in store.unused_ranked_groups()] == groups[5:]


def test_the_same_ranking_sent_twice_at_once_is_stored_once(store):
    _experts(store, "alice")
    g = _group(store)
    start = threading.Barrier(2)
    outcomes = []

    def send():
        start.wait()
        try:
            outcomes.append(store.add_ranking(g, "alice", [[f"{g}-c0"], [f"{g}-c1"]])["id"])
        except StoreError as error:
            outcomes.append(str(error))

    threads = [threading.Thread(target=send) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store.rankings()) == 1
    assert sorted(outcomes, key=str)[1].endswith("one ranking per expert")


def test_sqlite_runs_in_wal_mode_with_foreign_keys(tmp_path):
    store = Store(tmp_path / "work")
    assert (store.engine.url.database or "").endswith("workbench.db")
    with store.engine.connect() as connection:
        assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert connection.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert connection.execute(text("PRAGMA busy_timeout")).scalar() > 0
    store.close()


def test_postgresql_is_a_real_server_with_foreign_keys(tmp_path, postgres):
    """The PostgreSQL cases really run on PostgreSQL, which enforces what SQLite needs a pragma for."""
    with postgres.database() as url:
        store = Store(tmp_path / "work", url)
        try:
            with store.engine.connect() as connection:
                assert connection.execute(text("SELECT version()")).scalar().startswith("PostgreSQL ")
            with pytest.raises(StoreError, match="update names unknown groups: nope"):
                store.record_update("admin", "grpo", ["nope"], applied=True)
            _experts(store, "alice")
            g = _group(store)
            with pytest.raises(Exception, match="foreign key"):
                with store.engine.begin() as connection:
                    connection.execute(text("INSERT INTO update_groups (update_id, group_id) VALUES (999, :g)"), {"g": g})
        finally:
            store.close()
