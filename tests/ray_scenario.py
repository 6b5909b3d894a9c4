"""The two-node Ray scenario of test_ray_cluster.py, run inside a loopback-only network namespace (netns.py):
it observes and records, the test asserts. Run as `python tests/ray_scenario.py --out FILE --workdir DIR`.

1. A SeaweedFS (inside the namespace: its 127.0.0.1 is not the host's), a cluster of two Ray nodes with one CPU
   each, Serve's proxy on the head, and `serve run server.ray_app:build store=s3://... replicas=2` (one replica
   per node, since each needs a CPU).
2. An upload through the proxy, then every answer for the next 3 s: which replica, which version, when.
3. One replica's actor killed while a client keeps asking for predictions and another keeps uploading versions:
   every request and its outcome is recorded, until the replacement has answered and the uploads stopped; then
   the store's versions and what every replica answers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent)]

import httpx  # noqa: E402
import ray_cluster as rc  # noqa: E402
from s3_server import BUCKET, KEY, SECRET, SeaweedFS, new_prefix  # noqa: E402
from serve_process import TOKEN, s3_variables, variant  # noqa: E402

TASK = "ray-scale"
TEXT = {"inputs": ["a gripping, beautifully acted film"]}
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def ask(c: httpx.Client, task: str = TASK) -> dict:
    """One /predict through the proxy: what answered, or how it failed."""
    start = time.perf_counter()
    try:
        r = c.post("/predict", params={"task": task}, json=TEXT)
        out = {"status": r.status_code, "replica": r.headers.get("x-bitfit-replica"),
               "version": r.json().get("version") if r.status_code == 200 else None,
               "detail": None if r.status_code == 200 else r.text[:300]}
    except httpx.HTTPError as e:
        out = {"status": None, "replica": None, "version": None, "detail": f"{type(e).__name__}: {e}"[:300]}
    return out | {"t": start, "s": time.perf_counter() - start}


def upload(c: httpx.Client, seed: int) -> dict:
    start = time.perf_counter()
    try:
        r = c.put(f"/tasks/{TASK}", content=variant(TASK, seed), headers=AUTH)
        ok = r.status_code == 201
        return {"t": start, "status": r.status_code, "version": r.json()["version"] if ok else None,
                "replica": r.headers.get("x-bitfit-replica"), "detail": None if ok else r.text[:300]}
    except httpx.HTTPError as e:
        return {"t": start, "status": None, "version": None, "replica": None, "detail": f"{type(e).__name__}: {e}"}


def propagation(c: httpx.Client, seed: int, watch_s: float = 3.0) -> dict:
    """Upload one version, then ask for `watch_s` seconds; times are seconds after the upload was answered."""
    done = upload(c, seed)
    acked = time.perf_counter()
    answers = []
    while time.perf_counter() - acked < watch_s:
        a = ask(c)
        answers.append({"after_s": a["t"] - acked, "replica": a["replica"], "version": a["version"],
                        "status": a["status"]})
    return {"upload": done, "answers": answers}


class Loop(threading.Thread):
    """Calls `fn(i)` over and over until stopped, keeping every result."""

    def __init__(self, fn, pause_s: float = 0.0):
        super().__init__(daemon=True)
        self.fn, self.pause_s, self.results, self.stop = fn, pause_s, [], threading.Event()

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            self.results.append(self.fn(i))
            i += 1
            self.stop.wait(self.pause_s)


def replacement(url: str, victim: str, before: set[str]) -> dict:
    """Kill `victim` while asking and uploading; wait for a new replica to answer; then settle and look."""
    asker_client = httpx.Client(base_url=url, timeout=30)
    uploader_client = httpx.Client(base_url=url, timeout=30)
    asker = Loop(lambda i: ask(asker_client))
    uploader = Loop(lambda i: upload(uploader_client, 1000 + i), pause_s=0.3)
    asker.start()
    uploader.start()
    time.sleep(2.0)
    killed_at = time.perf_counter()
    rc.kill_replica(victim)
    new, deadline = None, time.monotonic() + 300
    while new is None and time.monotonic() < deadline:  # a replica that was not there before has answered
        new = next((r["replica"] for r in list(asker.results) if r["replica"] and r["replica"] not in before), None)
        time.sleep(0.2)
    replaced_at = time.perf_counter()
    time.sleep(2.0)
    uploader.stop.set()
    uploader.join(60)
    time.sleep(1.5)  # past the bound: from here every answer must name the active version
    asker.stop.set()
    asker.join(60)
    with httpx.Client(base_url=url, timeout=30) as c:
        stored = c.get(f"/tasks/{TASK}").json()
        settled = [ask(c) for _ in range(40)]
        replicas_now = rc.replica_counts()
    asker_client.close()
    uploader_client.close()
    rel = lambda rows: [{**r, "t": r["t"] - killed_at} for r in rows]  # noqa: E731
    return {"victim": victim, "new_replica": new, "replaced_after_s": replaced_at - killed_at,
            "asks": rel(asker.results), "uploads": rel(uploader.results),
            "stored_versions": [v["version"] for v in stored.get("versions", [])], "active": stored.get("active"),
            "settled": rel(settled), "replica_states": replicas_now}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--workdir", required=True, type=Path)
    a = p.parse_args()
    a.workdir.mkdir(parents=True, exist_ok=True)
    result: dict = {"phases_s": {}}
    t0 = time.perf_counter()

    def phase(name: str) -> None:
        result["phases_s"][name] = round(time.perf_counter() - t0, 1)
        print(f"[{time.perf_counter() - t0:6.1f} s] {name}", flush=True)

    with SeaweedFS(a.workdir / "s3") as s3:
        os.environ.update(s3_variables(s3.env.endpoint, KEY, SECRET))
        os.environ["BITFIT_ADMIN_TOKEN"] = TOKEN  # in the replicas' environment, never on a command line
        location = f"s3://{BUCKET}/{new_prefix('ray')}"
        phase("s3 up")
        port = rc.SERVE_PORT
        url = f"http://{rc.LOOPBACK}:{port}"
        with rc.cluster(a.workdir, nodes=2, http_port=port) as c:
            phase("cluster up")
            rc.serve_run(c.address, {"store": location, "replicas": "2", "health_check_period_s": "1"},
                         a.workdir / "serve-run.log")
            phase("deployed")
            result["replicas"] = rc.replicas_seen(url, want=2)
            with httpx.Client(base_url=url, timeout=30) as client:
                result["propagation"] = propagation(client, seed=1)
            phase("propagation")
            victim = sorted(result["replicas"])[0]
            result["replacement"] = replacement(url, victim, set(result["replicas"]))
            phase("replacement")
            result["replicas_after"] = rc.replicas_seen(url, want=2)
    phase("shut down")
    a.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
