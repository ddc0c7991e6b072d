"""The control room as experts feel it: time to first survivor, and ranking latency under load.

Run: ``python tests/benchmarks/bench_room.py [--experts 20] [--rounds 5]``. One process serves the
page on the embedded default model (20 DDIM steps, 4 survivors) with logins on, and measures over
HTTP with gradio_client:

- time to first survivor: from the /generate call until its group arrives with its survivors,
  against a plain ``policy.sample`` of one batch in the same process (the ratio is the overhead of
  the selector, the store and HTTP);
- ranking latency: ``--experts`` experts submitting at once, with the model idle and then while an
  admin's update holds it; p50 and p95, and the ratio of the p95s; once through Gradio's queue
  (gradio_client's ``/rank``) and once through the plain route (``POST /room/rank``, the experts'
  HTTP clients in a process of their own, ``tests/http_experts.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import numpy as np  # noqa: E402
from gradio_client import Client  # noqa: E402

from workbench.api import RANK_ROUTE, RoomAPI  # noqa: E402
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


def route_experts(url: str, names: list[str], groups: list) -> subprocess.Popen:
    """The experts' HTTP clients in their own process, logged in and ready to post their rankings of ``groups``."""
    experts = subprocess.Popen([sys.executable, str(Path(__file__).resolve().parents[1] / "http_experts.py")],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    rankings = {name: [{"group_id": g.id, "tiers": [[c.id] for c in g.survivors]} for g in groups] for name in names}
    experts.stdin.write(json.dumps({"url": url, "password": PASSWORD, "route": RANK_ROUTE, "rankings": rankings}) + "\n")
    experts.stdin.flush()
    assert experts.stdout.readline().strip() == "ready"
    return experts


def rank_by_route(experts: subprocess.Popen) -> list[float]:
    experts.stdin.write("go\n")
    experts.stdin.flush()
    outcome = json.loads(experts.stdout.readline())
    experts.wait()
    assert not outcome["errors"], outcome["errors"]
    return outcome["latencies"]


def report(label: str, idle: list[float], busy: list[float], still_running: bool) -> None:
    p50_idle, p95_idle = np.percentile(idle, [50, 95])
    p50_busy, p95_busy = np.percentile(busy, [50, 95])
    print(f"{label}, model idle: p50 {p50_idle * 1000:.0f} ms, p95 {p95_idle * 1000:.0f} ms; during an update: "
          f"p50 {p50_busy * 1000:.0f} ms, p95 {p95_busy * 1000:.0f} ms (update still running at the end: "
          f"{still_running}); p95 ratio busy/idle {p95_busy / p95_idle:.2f}")


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
    idle = {"queue": rank_all(page.local_url, clients, [room.generate(PROMPT, seed=s) for s in (1, 2)])}
    idle["route"] = rank_by_route(route_experts(page.local_url, names, [room.generate(PROMPT, seed=s) for s in (3, 4)]))

    busy, still_running = {}, {}
    for path, seeds in (("queue", (5, 6)), ("route", (7, 8))):
        groups = [room.generate(PROMPT, seed=s) for s in seeds]
        experts = route_experts(page.local_url, names, groups) if path == "route" else None
        room.rank(groups[0].id, [[c.id] for c in groups[0].survivors], expert="admin")  # something to learn from
        updater = threading.Thread(target=admin.predict, kwargs=dict(algorithm="grpo", settings={"epochs": 8},
                                                                     api_name="/apply_update"))
        updater.start()
        while not room.model_lock.locked():
            time.sleep(0.01)
        busy[path] = rank_by_route(experts) if experts else rank_all(page.local_url, clients, groups)
        still_running[path] = updater.is_alive()
        updater.join()

    report(f"ranking through Gradio's queue (gradio_client /rank), {args.experts} experts x 2 groups at once",
           idle["queue"], busy["queue"], still_running["queue"])
    report(f"ranking through POST {RANK_ROUTE}, same", idle["route"], busy["route"], still_running["route"])
    page.close()


if __name__ == "__main__":
    main()
