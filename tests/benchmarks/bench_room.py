"""The control room as experts feel it: time to first survivor, and ranking latency under load.

Run: ``python tests/benchmarks/bench_room.py [--experts 20] [--rounds 5]``. One process serves the
page on the embedded default model (20 DDIM steps, 4 survivors) with logins on, and measures over
HTTP with gradio_client:

- time to first survivor: from the /generate call until its group arrives with its survivors,
  against a plain ``policy.sample`` of one batch in the same process (the ratio is the overhead of
  the selector, the store and HTTP);
- ranking latency: ``--experts`` experts submitting at once, with the model idle and then while an
  admin's update holds it; p50 and p95, and the ratio of the p95s.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import numpy as np  # noqa: E402
from gradio_client import Client  # noqa: E402

from workbench.api import RoomAPI  # noqa: E402
from workbench.auth import Users, hash_password  # noqa: E402
from workbench.room import ControlRoom, RoomConfig  # noqa: E402
from workbench.ui import serve  # noqa: E402

PROMPT = "OCT: retinal layers with subretinal fluid"
PASSWORD = "benchmark-password"


def rank_all(url: str, clients: dict[str, Client], groups: list) -> list[float]:
    """Every expert ranks every group at once; returns each submission's latency in seconds."""
    latencies, lock = [], threading.Lock()

    def expert(name: str):
        for group in groups:
            ids = [c.id for c in group.survivors]
            started = time.perf_counter()
            clients[name].predict(group_id=group.id, tiers=[[i] for i in ids], api_name="/rank")
            with lock:
                latencies.append(time.perf_counter() - started)

    threads = [threading.Thread(target=expert, args=(name,)) for name in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp())
    names = [f"expert{k:02d}" for k in range(args.experts)]
    digest = hash_password(PASSWORD)
    (folder / "users.yaml").write_text("users:\n" + "".join(
        f"  - {{username: {name}, role: {'admin' if name == 'admin' else 'expert'}, level: 2, password_hash: '{digest}'}}\n"
        for name in ["admin", *names]))
    room = ControlRoom(workdir=folder / "run", config=RoomConfig(survivors=4, batch_size=4, max_draws=16, steps=20),
                       auto_register=False)
    page = serve(RoomAPI(room, Users(folder / "users.yaml")), block=False)
    admin = Client(page.local_url, auth=("admin", PASSWORD), verbose=False)

    first_survivor, plain = [], []
    for k in range(args.rounds):  # alternating, so drift on a shared machine hits both alike
        started = time.perf_counter()
        room.policy.sample(PROMPT, n=4, seed=100 + k, steps=20, guidance=5.0)
        plain.append(time.perf_counter() - started)
        started = time.perf_counter()
        group = admin.predict(prompt=PROMPT, n=4, seed=100 + k, api_name="/generate")
        first_survivor.append(time.perf_counter() - started)
        assert group["survivors"], group["message"]
    print(f"time to first survivor over HTTP: min {min(first_survivor):.2f} s, median {np.median(first_survivor):.2f} s; "
          f"plain policy.sample of one batch: min {min(plain):.2f} s; ratio of minima {min(first_survivor) / min(plain):.2f}")

    clients = {name: Client(page.local_url, auth=(name, PASSWORD), verbose=False) for name in names}
    idle_groups = [room.generate(PROMPT, seed=s) for s in (1, 2)]
    idle = rank_all(page.local_url, clients, idle_groups)

    busy_groups = [room.generate(PROMPT, seed=s) for s in (3, 4)]
    room.rank(idle_groups[0].id, [[c.id] for c in idle_groups[0].survivors], expert="admin")
    updater = threading.Thread(target=admin.predict, kwargs=dict(algorithm="grpo", settings={"optimizer_steps": 8},
                                                                 api_name="/apply_update"))
    updater.start()
    while not room.model_lock.locked():
        time.sleep(0.01)
    busy = rank_all(page.local_url, clients, busy_groups)
    still_running = updater.is_alive()
    updater.join()

    p50_idle, p95_idle = np.percentile(idle, [50, 95])
    p50_busy, p95_busy = np.percentile(busy, [50, 95])
    print(f"ranking, {args.experts} experts x 2 groups at once, model idle: p50 {p50_idle * 1000:.0f} ms, p95 {p95_idle * 1000:.0f} ms")
    print(f"ranking, same, during an update: p50 {p50_busy * 1000:.0f} ms, p95 {p95_busy * 1000:.0f} ms "
          f"(update still running when the last ranking returned: {still_running}); p95 ratio busy/idle {p95_busy / p95_idle:.2f}")
    page.close()


if __name__ == "__main__":
    main()
