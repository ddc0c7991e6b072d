"""Rank, stop the app, start it again: everything is still there (``python app.py`` as a real process)."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import datasets
import httpx
import pytest
from gradio_client import Client

from tests.conftest import PROMPT
from workbench.auth import add_user

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(workdir: Path, users: Path, port: int) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "app.py", "--workdir", str(workdir), "--auth", str(users),
                                "--port", str(port)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    deadline = time.time() + 120
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"app.py exited with {process.returncode}: {process.stdout.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.5)
    process.kill()
    raise AssertionError("app.py did not answer within 120 s")


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGINT)  # Ctrl-C, as a person stops it
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def test_rankings_and_waiting_groups_survive_a_restart(tmp_path):
    users, workdir, port = tmp_path / "users.yaml", tmp_path / "run", free_port()
    add_user(users, "alice", "alice-password", role="admin", level=3)
    app = start(workdir, users, port)
    try:
        alice = Client(f"http://127.0.0.1:{port}/", auth=("alice", "alice-password"), verbose=False)
        ranked = alice.predict(prompt=PROMPT, n=4, seed=1, api_name="/generate")
        waiting = alice.predict(prompt="CT: axial slice with a bright lesion", n=4, seed=2, api_name="/generate")
        ids = [c["id"] for c in ranked["survivors"]]
        alice.predict(group_id=ranked["id"], tiers=[[ids[1]], [ids[0], ids[2]], [ids[3]]], ratings={ids[1]: 3},
                      api_name="/rank")
    finally:
        stop(app)

    app = start(workdir, users, port)
    try:
        alice = Client(f"http://127.0.0.1:{port}/", auth=("alice", "alice-password"), verbose=False)
        with pytest.raises(Exception, match="already ranked group"):  # the ranking is stored
            alice.predict(group_id=ranked["id"], tiers=[ids], api_name="/rank")
        rows = datasets.load_dataset("parquet", data_files=alice.predict(kind="groups", api_name="/export"),
                                     split="train")
        assert len(rows) == 1 and rows[0]["prompt"] == PROMPT and rows[0]["ranking"] == [2, 1, 2, 3]
        numbers = alice.predict(group_id=ranked["id"], api_name="/losses")
        assert [c["ratio"] for c in numbers["grpo"]["candidates"]] == [1.0] * 4  # the stored chains re-score exactly
        others = [c["id"] for c in waiting["survivors"]]  # the group that was waiting can be ranked now
        assert alice.predict(group_id=waiting["id"], tiers=[others], api_name="/rank")["group_id"] == waiting["id"]
    finally:
        stop(app)
