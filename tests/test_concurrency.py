"""Twenty experts rank at once over HTTP while an admin's update holds the model.

Nothing may be lost or duplicated, and ranking must not queue behind the update (it only touches
the store). The p95 latency of a ranking submission is printed.
"""

import threading
import time

import numpy as np
import pytest
from gradio_client import Client

from tests.conftest import PROMPT
from workbench.api import RoomAPI
from workbench.auth import Users, hash_password
from workbench.room import ControlRoom, RoomConfig
from workbench.ui import serve

EXPERTS = [f"expert{k:02d}" for k in range(20)]
PASSWORD = "same-password-for-the-test"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("concurrency")
    digest = hash_password(PASSWORD)  # one hash for all: twenty scrypt runs would only slow the test
    lines = ["users:", "  - {username: admin, role: admin, level: 3, password_hash: '%s'}" % digest]
    lines += ["  - {username: %s, role: expert, level: %d, password_hash: '%s'}" % (name, 1 + k % 3, digest)
              for k, name in enumerate(EXPERTS)]
    (folder / "users.yaml").write_text("\n".join(lines) + "\n")
    room = ControlRoom(workdir=folder / "run", config=RoomConfig(survivors=4, batch_size=4, max_draws=8, steps=4),
                       auto_register=False)
    page = serve(RoomAPI(room, Users(folder / "users.yaml")), block=False)
    yield page.local_url, room
    page.close()


def test_twenty_experts_rank_while_an_update_runs(served, capsys):
    url, room = served
    first = room.generate(PROMPT, seed=0)
    room.enroll("admin", "admin", 3)
    room.rank(first.id, [[c.id] for c in first.survivors], expert="admin")  # something for the update to learn from
    groups = [room.generate(PROMPT, seed=s) for s in (1, 2)]

    admin = Client(url, auth=("admin", PASSWORD), verbose=False)
    clients = {name: Client(url, auth=(name, PASSWORD), verbose=False) for name in EXPERTS}
    update = {}

    def run_update():
        update["result"] = admin.predict(algorithm="grpo", settings={"optimizer_steps": 40}, api_name="/apply_update")

    updater = threading.Thread(target=run_update)
    updater.start()
    deadline = time.time() + 60
    while not room.model_lock.locked():  # the update holds the model
        assert time.time() < deadline and updater.is_alive(), "the update never started"
        time.sleep(0.01)

    latencies, during_update, errors = [], [], []
    lock = threading.Lock()

    def expert(name: str):
        rng = np.random.default_rng(int(name[-2:]))
        for group in groups:
            ids = [c.id for c in group.survivors]
            order = [ids[i] for i in rng.permutation(len(ids))]
            tiers = [[order[0]], order[1:3], [order[3]]]  # a tie in the middle
            started = time.perf_counter()
            try:
                clients[name].predict(group_id=group.id, tiers=tiers, seconds=1.0, api_name="/rank")
            except Exception as error:  # noqa: BLE001 - collected and reported below
                with lock:
                    errors.append(f"{name}: {error}")
                continue
            with lock:
                latencies.append(time.perf_counter() - started)
                during_update.append(room.model_lock.locked())

    threads = [threading.Thread(target=expert, args=(name,)) for name in EXPERTS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    updater.join()

    assert not errors, errors
    for group in groups:
        stored = room.store.rankings(group.id)
        assert sorted(r["expert"] for r in stored) == EXPERTS  # every expert once: none lost, none twice
    assert "result" in update and update["result"]["message"]
    assert any(during_update), "no ranking finished while the update held the model: ranking waited for it"
    p50, p95 = np.percentile(latencies, [50, 95])
    with capsys.disabled():
        print(f"\n40 rankings by 20 experts during an update: p50 {p50 * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms, "
              f"{sum(during_update)}/40 finished while the update held the model")
