"""A shared box: what a kill -9 leaves is put right at start-up, the export key is made once and
privately, imports leave nothing behind, exports are an admin's and one at a time, prompts are one
line of text."""

import logging
import os
import re
import stat
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from data.store import StoreError
from optim.versions import VersionStore
from tests.conftest import PROMPT
from workbench.api import RANK_ROUTE, Caller, RoomAPI
from workbench.auth import Users, add_user
from workbench.room import ControlRoom, RoomConfig
from workbench.ui import serve

CONFIG = RoomConfig(survivors=2, batch_size=2, max_draws=4, steps=4, pass_rate_probe=0)
ADMIN, EXPERT = Caller("alice", "admin", 3), Caller("bob", "expert", 2)


def ranked_room(workdir, n_groups=1) -> tuple[ControlRoom, list[str]]:
    room = ControlRoom(workdir=workdir, config=CONFIG)
    ids = []
    for seed in range(n_groups):
        group = room.generate(PROMPT, seed=seed)
        room.rank(group.id, [[c.id] for c in group.survivors], expert="alice")
        ids.append(group.id)
    return room, ids


class Killed(BaseException):
    """What the process would see of a kill -9: nothing after this point runs."""


@pytest.mark.parametrize("killed_in", ["record_version", "record_update"])
def test_a_kill_between_saving_a_version_and_recording_its_update_is_recorded_at_start_up(tmp_path, caplog, killed_in):
    room, groups = ranked_room(tmp_path)

    def kill(*args, **kwargs):
        raise Killed()

    setattr(room.store, killed_in, kill)
    with pytest.raises(Killed):
        room.apply_update("dpo", who="alice")
    assert room.version_store.current == "v1"  # saved and current, but the store never heard of the update
    assert room.store.unused_ranked_groups() != []  # without the fix, the next update trains them again
    room.store.close()

    with caplog.at_level(logging.WARNING, logger="workbench.room"):
        restarted = ControlRoom(workdir=tmp_path, config=CONFIG)
    assert "recorded the update that made v1 from its meta.json" in caplog.text
    assert [v["id"] for v in restarted.store.versions()] == ["v0", "v1"]
    update = restarted.store.updates()[-1]
    assert (update["version_id"], update["who"], update["algorithm"], update["applied"]) == ("v1", "alice", "dpo", True)
    assert update["groups"] == groups and restarted.store.unused_ranked_groups() == []
    assert restarted.policy.version == "v1"
    with pytest.raises(ValueError, match="no ranked groups to learn from yet"):
        restarted.apply_update("dpo", who="alice")  # nothing is trained twice
    restarted.store.close()
    assert len(ControlRoom(workdir=tmp_path, config=CONFIG).store.updates()) == 1  # a second start records nothing more


def test_staging_folders_and_a_version_that_never_became_current_are_cleared_at_start_up(tmp_path, caplog):
    room, groups = ranked_room(tmp_path)
    # A kill inside VersionStore.save after the rename, before CURRENT moved: v1 on disk, v0 current.
    store = room.version_store
    store.save(room.policy.lora_state_dict(), parent="v0", algorithm="grpo", base_model=str(room.policy.model_path),
               metrics={"groups": groups, "who": "alice"})
    store.set_current("v0")
    (store.root / ".staging-x1y2").mkdir()
    room.store.close()

    with caplog.at_level(logging.WARNING, logger="workbench.room"):
        restarted = ControlRoom(workdir=tmp_path, config=CONFIG)
    assert f"removed {store.root / '.staging-x1y2'}: a version was being written" in caplog.text
    assert "set v1 aside to" in caplog.text and "never became current" in caplog.text
    assert [v.id for v in VersionStore(store.root).list()] == ["v0"] and not (store.root / ".staging-x1y2").exists()
    assert [p.name[:len(".set-aside-v1-")] for p in store.root.iterdir() if p.name.startswith(".set-aside")] == [
        ".set-aside-v1-"]
    assert [g["id"] for g in restarted.store.unused_ranked_groups()] == groups  # v1 never served: its groups stay


def test_the_export_key_is_made_once_privately_even_by_concurrent_first_exports(tmp_path):
    room = ControlRoom(workdir=tmp_path, config=CONFIG)
    umask = os.umask(0)  # the most permissive umask: the key must still be its owner's alone
    try:
        with ThreadPoolExecutor(8) as pool:
            keys = list(pool.map(lambda _: room._secret(), range(8)))
    finally:
        os.umask(umask)
    assert len(set(keys)) == 1 and len(keys[0]) == 64
    path = tmp_path / "export.secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600, oct(path.stat().st_mode)
    assert path.read_text() == keys[0] and room._secret() == keys[0]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export.secret")]  # no temporary left


def test_an_import_leaves_no_unpacked_file_even_after_an_error_and_start_up_clears_a_killed_one(tmp_path):
    room = ControlRoom(workdir=tmp_path, config=CONFIG)
    archive = tmp_path / "broken.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("ratings.csv", "not,the,columns\n1,2,3\n")
        zipped.writestr("images/scan.dcm", b"patient data")
    with pytest.raises(ValueError, match="ratings.csv"):
        room.import_ratings(archive, imported_by="alice")
    assert room.imports == tmp_path / "imports" and list(room.imports.iterdir()) == []

    left = room.imports / "tmpkilled" / "images"  # what a kill during an import leaves
    left.mkdir(parents=True)
    (left / "scan.dcm").write_bytes(b"patient data")
    room.store.close()
    assert list(ControlRoom(workdir=tmp_path, config=CONFIG).imports.iterdir()) == []


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    return RoomAPI(ControlRoom(workdir=tmp_path_factory.mktemp("api"), config=CONFIG))


def test_exports_are_an_admins_and_run_one_at_a_time(api, monkeypatch):
    with pytest.raises(PermissionError, match="only an admin can export datasets; bob is an expert"):
        api.export(EXPERT, "pickapic")

    running, most = [0], [0]
    lock = threading.Lock()

    def slow_export(kind, path, dicom=False):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        path.write_bytes(b"")
        return path

    monkeypatch.setattr(api.room, "export", slow_export)
    with ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(lambda _: api.export(ADMIN, "groups"), range(4)))
    assert most[0] == 1 and len(set(paths)) == 4  # four exports, never two at once, each its own file


@pytest.mark.parametrize("prompt, shown", [("CT: axial\nslice", "U+000A) at position 10"),
                                           ("CT:\taxial slice", "U+0009) at position 4"),
                                           ("CT: axial slice\x1b[31m", "U+001B) at position 16"),
                                           ("CT: axial\x85slice", "U+0085) at position 10")])
def test_a_prompt_with_a_control_character_is_refused(api, prompt, shown):
    for verb in (api.generate, api.sample):
        with pytest.raises(ValueError, match=re.escape(f"control character ({shown}; a prompt is one line of plain text")):
            verb(ADMIN, prompt)
    assert api.room.store.group_count() == 0


# ---------------------------------------------------------------------- over HTTP

PASSWORDS = {"alice": "alice-password", "bob": "bob-password"}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The page with logins (alice admin, bob expert level 2), uploads limited to 1 kB for the test."""
    folder = tmp_path_factory.mktemp("served")
    add_user(folder / "users.yaml", "alice", PASSWORDS["alice"], role="admin", level=3)
    add_user(folder / "users.yaml", "bob", PASSWORDS["bob"], role="expert", level=2)
    room = ControlRoom(workdir=folder / "run", config=CONFIG, auto_register=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("workbench.ui.MAX_UPLOAD", "1kb")
        page = serve(RoomAPI(room, Users(folder / "users.yaml")), block=False)
    yield page, room
    page.close()


def logged_in(url: str, name: str) -> httpx.Client:
    session = httpx.Client(base_url=url)
    assert session.post("/login", data={"username": name, "password": PASSWORDS[name]}).status_code == 200
    return session


def test_a_ranking_posted_to_the_plain_route_with_the_same_login_and_roles(served):
    page, room = served
    group = room.generate(PROMPT, seed=21)
    a, b = (c.id for c in group.survivors)
    body = {"group_id": group.id, "tiers": [[b], [a]], "ratings": {b: 3}, "seconds": 2.5}

    refused = httpx.post(page.local_url + RANK_ROUTE.lstrip("/"), json=body)
    assert (refused.status_code, refused.json()) == (401, {"error": "not logged in: POST /login with username and "
                                                                     "password first"})
    bob = logged_in(page.local_url, "bob")
    impostor = bob.post(RANK_ROUTE, json=body | {"expert": "alice"})
    assert (impostor.status_code, impostor.json()["error"]) == (403, "logged in as bob: cannot rank as 'alice'")
    left_out = bob.post(RANK_ROUTE, json=body | {"tiers": [[b]]})
    assert left_out.status_code == 400 and f"ranking leaves out candidates: {a}" in left_out.json()["error"]
    unknown = bob.post(RANK_ROUTE, json=body | {"group_id": "nope"})
    assert (unknown.status_code, unknown.json()["error"]) == (400, "unknown group 'nope'")

    stored = bob.post(RANK_ROUTE, json=body)
    assert stored.status_code == 200, stored.text
    ranking = stored.json()
    assert (ranking["expert"], ranking["level"], ranking["tiers"], ranking["ratings"], ranking["seconds"]) == (
        "bob", 2, [[b], [a]], {b: 3}, 2.5)  # the level comes from the accounts file, never the body
    assert room.store.rankings(group.id) == [ranking]
    again = bob.post(RANK_ROUTE, json=body)
    assert again.status_code == 400 and "has already ranked group" in again.json()["error"]


def test_a_login_enrols_the_expert_and_a_changed_level_is_enrolled_at_the_next_call(served, tmp_path):
    """The store learns an expert at their login, so twenty first rankings at once are inserts alone;
    a level changed in the accounts file later reaches the store at that expert's next call."""
    page, room = served
    accounts = room.workdir.parent / "users.yaml"
    add_user(accounts, "carol", "carol-password", role="expert", level=3)
    with pytest.raises(StoreError, match="unknown expert 'carol'"):
        room.store.get_expert("carol")
    carol = httpx.Client(base_url=page.local_url)
    assert carol.post("/login", data={"username": "carol", "password": "carol-password"}).status_code == 200
    assert (room.store.get_expert("carol")["role"], room.store.get_expert("carol")["level"]) == ("expert", 3)

    add_user(accounts, "carol", "carol-password", role="expert", level=1, replace=True)
    group = room.generate(PROMPT, seed=22)
    stored = carol.post(RANK_ROUTE, json={"group_id": group.id, "tiers": [[c.id] for c in group.survivors]})
    assert stored.status_code == 200, stored.text
    assert stored.json()["level"] == 1 and room.store.get_expert("carol")["level"] == 1


def test_five_failed_logins_get_a_429_with_the_wait_and_uploads_over_the_limit_are_refused(served):
    page, _ = served
    alice = logged_in(page.local_url, "alice")  # before the failures below lock this address out
    for _ in range(5):
        assert httpx.post(page.local_url + "login", data={"username": "bob", "password": "guess"}).status_code == 400
    locked = httpx.post(page.local_url + "login", data={"username": "bob", "password": PASSWORDS["bob"]})
    assert locked.status_code == 429 and int(locked.headers["retry-after"]) == 30
    assert locked.json()["detail"] == "too many failed logins for user 'bob': try again in 30 s"

    from_here = httpx.post(page.local_url + "login", data={"username": "alice", "password": PASSWORDS["alice"]})
    assert from_here.status_code == 429 and "for address 127.0.0.1" in from_here.json()["detail"]

    small = alice.post("/gradio_api/upload", files={"files": ("small.csv", b"x" * 1000)})
    big = alice.post("/gradio_api/upload", files={"files": ("big.csv", b"x" * 2000)})
    assert small.status_code == 200, small.text
    assert (big.status_code, big.text) == (413, "File size exceeded maximum allowed size of 1024 bytes.")
    assert page.delete_cache == (3600, 6 * 3600)


def test_serving_beyond_loopback_without_logins_is_refused_unless_insecure_is_asked(monkeypatch, capsys):
    import app

    assert app.main(["--host", "0.0.0.0"]) == 2
    assert capsys.readouterr().err.startswith("error: --host 0.0.0.0 without --auth: anyone who can reach this "
                                              "address could rank, update, roll back and export as an admin")
    served_on = []
    monkeypatch.setattr(app, "port_problem", lambda host, port: None)  # another test's page may hold the port
    monkeypatch.setattr("workbench.room.ControlRoom", lambda *args, **kwargs: None)
    monkeypatch.setattr("workbench.api.RoomAPI", lambda room, users: users)
    monkeypatch.setattr("workbench.ui.serve", lambda api, host, port: served_on.append(host))
    assert app.main(["--host", "0.0.0.0", "--insecure-no-auth"]) == 0
    assert app.main(["--host", "::1"]) == 0 and served_on == ["0.0.0.0", "::1"]
    assert "warning: --insecure-no-auth" in capsys.readouterr().err
    assert [app.is_loopback(h) for h in ("localhost", "127.0.0.2", "::1", "0.0.0.0", "10.1.2.3", "box.lan")] == [
        True, True, True, False, False, False]
