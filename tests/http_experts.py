"""Twenty experts' browsers for tests/test_concurrency.py, in a process of their own, as experts sit at
their own machines: their HTTP clients' work does not run inside the server's interpreter.

Reads one JSON line on stdin: ``{"url", "password", "route", "rankings": {name: [body, ...]}}``; logs
every expert in (``POST /login``), prints ``ready``, waits for a line on stdin, then all experts post
their rankings at once, each in order; prints one JSON line ``{"latencies": [...], "errors": [...]}``.
Imports nothing but httpx, so it starts in a moment.
"""

import json
import sys
import threading
import time

import httpx


def main() -> None:
    job = json.loads(sys.stdin.readline())
    sessions = {}
    for name in job["rankings"]:
        session = httpx.Client(base_url=job["url"], timeout=60)
        response = session.post("/login", data={"username": name, "password": job["password"]})
        response.raise_for_status()
        sessions[name] = session
    print("ready", flush=True)
    sys.stdin.readline()

    latencies, errors, lock = [], [], threading.Lock()
    start = threading.Barrier(len(sessions))

    def expert(name: str) -> None:
        start.wait()
        for body in job["rankings"][name]:
            started = time.perf_counter()
            response = sessions[name].post(job["route"], json=body)
            elapsed = time.perf_counter() - started
            with lock:
                if response.status_code == 200:
                    latencies.append(elapsed)
                else:
                    errors.append(f"{name}: {response.status_code} {response.text}")

    threads = [threading.Thread(target=expert, args=(name,)) for name in sessions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(json.dumps({"latencies": latencies, "errors": errors}), flush=True)


if __name__ == "__main__":
    main()
