"""The control room over HTTP, as clients meet it: served in-process, called with gradio_client.

One server with logins on (alice: admin, bob: expert) serves the round trip and the auth checks;
a second without logins checks local single-user mode.
"""

import datasets
import httpx
import numpy as np
import pytest
from gradio_client import Client
from PIL import Image

from tests.conftest import PROMPT
from optim.preference.update import UpdateConfig
from workbench.api import RoomAPI, update_config
from workbench.auth import Users, add_user
from workbench.room import ControlRoom, RoomConfig
from workbench.ui import serve

CONFIG = RoomConfig(survivors=3, batch_size=3, max_draws=6, steps=4)
PASSWORDS = {"alice": "alice-password", "bob": "bob-password"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("app")
    add_user(folder / "users.yaml", "alice", PASSWORDS["alice"], role="admin", level=3)
    add_user(folder / "users.yaml", "bob", PASSWORDS["bob"], role="expert", level=2)
    room = ControlRoom(workdir=folder / "run", config=CONFIG, auto_register=False)
    page = serve(RoomAPI(room, Users(folder / "users.yaml")), block=False)
    yield page.local_url, room, folder
    page.close()


def client(url: str, name: str) -> Client:
    return Client(url, auth=(name, PASSWORDS[name]), verbose=False)


def test_a_round_over_http_generate_rank_losses_update_sample_export(server):
    url, room, folder = server
    alice = client(url, "alice")
    group = alice.predict(prompt=PROMPT, n=3, seed=5, api_name="/generate")
    ids = [c["id"] for c in group["survivors"]]
    assert group["version"] == "v0" and len(ids) == 3 and all(i.startswith(group["id"]) for i in ids)
    assert "scores" not in group["survivors"][0]  # blind: survivors carry no selector scores
    assert Image.open(group["survivors"][0]["image"]).size == (64, 64)

    with pytest.raises(Exception, match="unknown candidates: nope"):
        alice.predict(group_id=group["id"], tiers=[[ids[0]], [ids[1], "nope"]], api_name="/rank")
    stored = alice.predict(group_id=group["id"], tiers=[[ids[2]], [ids[0], ids[1]]], ratings={ids[2]: 3},
                           seconds=3.5, api_name="/rank")
    assert stored["expert"] == "alice" and stored["level"] == 3  # the level comes from the accounts file

    numbers = alice.predict(group_id=group["id"], api_name="/losses")
    assert [c["ratio"] for c in numbers["grpo"]["candidates"]] == [1.0, 1.0, 1.0]
    assert numbers["dpo"]["loss"] == pytest.approx(np.log(2))
    # rewards 0.25, 0.25, 1 (the tie shares positions 2 and 3); mean 0.5, sample std sqrt(0.1875), eps 1e-4
    std = np.sqrt(0.1875) + 1e-4
    assert [c["advantage"] for c in numbers["grpo"]["candidates"]] == pytest.approx([-0.25 / std, -0.25 / std, 0.5 / std])

    update = alice.predict(algorithm="dpo", settings={"learning_rate": 3e-4}, api_name="/apply_update")
    assert update["applied"] and update["version"] == "v1", update["message"]
    assert [v["id"] for v in alice.predict(api_name="/versions") if v["current"]] == ["v1"]
    assert room.store.updates()[-1]["who"] == "alice"

    new = alice.predict(prompt=PROMPT, n=2, seed=9, version="v1", api_name="/sample")
    base = alice.predict(prompt=PROMPT, n=2, seed=9, version="v0", api_name="/sample")
    assert len(new) == 2
    assert np.abs(np.asarray(Image.open(new[0]), float) - np.asarray(Image.open(base[0]), float)).max() > 0

    parquet = alice.predict(kind="pickapic", api_name="/export")
    rows = datasets.load_dataset("parquet", data_files=parquet, split="train")
    assert len(rows) == 3 and set(rows["caption"]) == {PROMPT}
    assert sorted(zip(rows["label_0"], rows["label_1"])) == [(0.0, 1.0), (0.0, 1.0), (0.5, 0.5)]

    assert alice.predict(version_id="v0", api_name="/rollback")["current"]
    assert room.policy.version == "v0"


def test_every_route_refuses_a_caller_who_has_not_logged_in(server):
    url, _, _ = server
    with pytest.raises(Exception, match="credentials were not provided"):
        Client(url, verbose=False)
    refused = {}
    for path, method in [("config", "GET"), ("gradio_api/info", "GET"), ("gradio_api/openapi.json", "GET"),
                         ("gradio_api/queue/join", "POST"), ("gradio_api/call/rank", "POST"),
                         ("gradio_api/call/apply_update", "POST"), ("gradio_api/run/export", "POST"),
                         ("gradio_api/api/versions", "POST"), ("gradio_api/upload", "POST"),
                         ("gradio_api/file=app.py", "GET"), ("monitoring", "GET")]:
        response = httpx.request(method, url + path, json={"data": []})
        refused[path] = response.status_code
    assert all(code in (401, 403, 404) for code in refused.values()), refused
    assert refused["gradio_api/call/rank"] == 401 and refused["gradio_api/queue/join"] == 401


def test_a_wrong_password_is_refused(server):
    url, _, _ = server
    with pytest.raises(Exception):
        Client(url, auth=("alice", "not-her-password"), verbose=False)


def test_an_expert_ranks_but_cannot_update_or_roll_back(server):
    url, room, _ = server
    group = room.generate(PROMPT, seed=11)
    ids = [c.id for c in group.survivors]
    bob = client(url, "bob")
    with pytest.raises(Exception, match="cannot rank as 'alice'"):
        bob.predict(group_id=group.id, tiers=[ids], expert="alice", api_name="/rank")
    assert bob.predict(group_id=group.id, tiers=[[i] for i in ids], api_name="/rank")["level"] == 2
    versions_before = room.versions()
    with pytest.raises(Exception, match="only an admin can apply an update; bob is an expert"):
        bob.predict(algorithm="grpo", api_name="/apply_update")
    with pytest.raises(Exception, match="only an admin can roll back"):
        bob.predict(version_id="v0", api_name="/rollback")
    assert room.versions() == versions_before and room.store.updates()[-1]["who"] != "bob"
    with pytest.raises(Exception, match="already ranked group"):
        bob.predict(group_id=group.id, tiers=[ids], api_name="/rank")


def test_bad_input_gets_a_clear_message(server):
    url, _, _ = server
    alice = client(url, "alice")
    with pytest.raises(Exception, match="limit is 300"):
        alice.predict(prompt="CT: " + "x" * 400, api_name="/generate")
    with pytest.raises(Exception, match="prompt is empty"):
        alice.predict(prompt="  ", api_name="/generate")
    with pytest.raises(Exception, match="unknown export kind 'csv'"):
        alice.predict(kind="csv", api_name="/export")
    with pytest.raises(Exception, match="unknown update settings lr"):
        alice.predict(algorithm="grpo", settings={"lr": 1}, api_name="/apply_update")
    with pytest.raises(Exception, match=r"ai_weight must be a number above 0 and at most 3 \(a level-3 expert's weight\), not 5"):
        alice.predict(algorithm="grpo", settings={"ai_weight": 5}, api_name="/apply_update")
    with pytest.raises(Exception, match="balance_modalities must be true or false, not 'false'"):
        alice.predict(algorithm="grpo", settings={"balance_modalities": "false"}, api_name="/apply_update")
    with pytest.raises(Exception, match="unknown group 'nope'"):
        alice.predict(group_id="nope", api_name="/losses")
    # an unknown version's message as it is, not a quoted KeyError: "'unknown version ...'"
    with pytest.raises(Exception, match=r"^unknown version 'v9'; known versions: v0"):
        alice.predict(version_id="v9", api_name="/rollback")
    with pytest.raises(Exception, match=r"^unknown version 'v9'; known versions: v0"):
        alice.predict(prompt=PROMPT, n=1, seed=0, version="v9", api_name="/sample")
    with pytest.raises(Exception, match="the seed must be a whole number, not 2.5"):
        alice.predict(prompt=PROMPT, n=1, seed=2.5, api_name="/sample")
    with pytest.raises(Exception, match="epochs must be a whole number, not 2.5"):
        alice.predict(algorithm="grpo", settings={"epochs": 2.5}, api_name="/apply_update")
    with pytest.raises(Exception, match="ai_groups must be a whole number, not 'four'"):
        alice.predict(algorithm="grpo", settings={"ai_groups": "four"}, api_name="/apply_update")


def test_the_page_and_clients_settings_replace_the_update_defaults():
    """What the Optimize tab and ``/apply_update`` send reaches the update: balancing the modalities is on unless
    switched off, and only JSON's true or false switch it (``bool("false")`` would be true)."""
    assert UpdateConfig().balance_modalities
    config = update_config(UpdateConfig(), {"learning_rate": 3e-4, "kl_weight": 0.1, "balance_modalities": False})
    assert (config.learning_rate, config.grpo.kl_weight, config.balance_modalities) == (3e-4, 0.1, False)
    with pytest.raises(ValueError, match="balance_modalities must be true or false, not 1"):
        update_config(UpdateConfig(), {"balance_modalities": 1})
    # a field the page's form sends empty (None) is named, not "float() argument must be ... not 'NoneType'"
    with pytest.raises(ValueError, match="learning_rate must be a number, not an empty field"):
        update_config(UpdateConfig(), {"learning_rate": None})
    with pytest.raises(ValueError, match="beta must be a number, not nan"):
        update_config(UpdateConfig(), {"beta": float("nan")})
    assert update_config(UpdateConfig(), {"epochs": 4.0, "clip_range": "0.1"}).epochs == 4


def test_local_mode_needs_a_name_to_rank_and_no_login(tmp_path):
    room = ControlRoom(workdir=tmp_path, config=CONFIG)
    page = serve(RoomAPI(room), block=False)
    try:
        local = Client(page.local_url, verbose=False)
        group = local.predict(prompt=PROMPT, n=2, seed=3, api_name="/generate")
        ids = [c["id"] for c in group["survivors"]]
        with pytest.raises(Exception, match="type your name first"):
            local.predict(group_id=group["id"], tiers=[ids], api_name="/rank")
        stored = local.predict(group_id=group["id"], tiers=[ids], expert="carol", level=2, api_name="/rank")
        assert (stored["expert"], stored["level"]) == ("carol", 2)
    finally:
        page.close()


def test_a_logged_in_user_gets_only_the_files_handed_out(server):
    url, room, folder = server
    session = httpx.Client(base_url=url)
    assert session.post("login", data={"username": "bob", "password": PASSWORDS["bob"]}).status_code == 200
    room.export("groups", folder / "groups.parquet")  # makes the export key file
    for private in [folder / "users.yaml", folder / "run" / "workbench.db", room.workdir / "export.secret"]:
        assert private.exists()
        assert session.get(f"gradio_api/file={private}").status_code == 403, private
    with pytest.raises(Exception, match="only an admin can export datasets; bob is an expert"):
        client(url, "bob").predict(kind="groups", api_name="/export")
    handed_out = client(url, "alice").predict(kind="groups", api_name="/export")
    assert handed_out.endswith("ranking-groups.parquet")
