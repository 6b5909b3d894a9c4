"""Two `bitfit serve` processes on one s3:// store (a real SeaweedFS): a change made through either is answered by
the other within a second; S3 going away while serving degrades, never stops, the server, and it recovers without
a restart; a store that cannot be opened at start stops `bitfit serve` with an error naming endpoint and bucket.

Server A talks to S3 directly, server B through a FaultyProxy, so a test can take S3 away from B alone; the
server behind the proxy is the real one. Propagation times over more samples and 2 or 4 replicas are measured by
bench/scaleout.py; here each change must simply arrive within the bound.
"""

from __future__ import annotations

import statistics
import subprocess
import time
from dataclasses import dataclass

import pytest
from s3_server import BUCKET, KEY, SECRET, FaultyProxy, new_prefix
from serve_process import ServeProcess, bitfit_command, free_port, s3_variables, variant

pytestmark = pytest.mark.slow
BOUND_S = 1.0  # the bound: a change through one replica is answered by every other within a second
TEXT = {"inputs": ["a gripping, beautifully acted film"]}


@dataclass
class Pair:
    a: ServeProcess
    b: ServeProcess
    proxy: FaultyProxy

    def server(self, name: str) -> ServeProcess:
        return getattr(self, name)


@pytest.fixture(scope="module")
def pair(seaweedfs, tmp_path_factory):
    logs = tmp_path_factory.mktemp("scaleout")
    proxy = FaultyProxy(seaweedfs.s3_port)
    location = f"s3://{BUCKET}/{new_prefix('scaleout')}"
    env = s3_variables(seaweedfs.env.endpoint, KEY, SECRET)
    # both start together on an empty prefix, so both seed the shipped tasks at once: a race the store must absorb
    a = ServeProcess(location, env, log=logs / "a.log")
    b = ServeProcess(location, {**env, "AWS_ENDPOINT_URL": proxy.endpoint}, log=logs / "b.log")
    try:
        a.wait_ready()
        b.wait_ready()
        yield Pair(a, b, proxy)
    finally:
        a.stop()
        b.stop()
        proxy.close()


def answered_version(server: ServeProcess, task: str) -> str | None:
    r = server.client.post("/predict", params={"task": task}, json=TEXT)
    return r.json()["version"] if r.status_code == 200 else None


def seconds_until_answered(server: ServeProcess, task: str, version: str, limit: float = 10.0) -> float:
    """From now until `server` answers `task` with `version` (inf if not within `limit`)."""
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < limit:
        if answered_version(server, task) == version:
            return elapsed
        time.sleep(0.01)
    return float("inf")


def change(server: ServeProcess, op: str, task: str, seed: int) -> str:
    """Make one change through `server`; returns the version that is active once it answered."""
    c = server.client
    if op == "upload":
        r = c.put(f"/tasks/{task}", content=variant(task, seed))
    elif op == "activate":
        versions = [v["version"] for v in c.get(f"/tasks/{task}").json()["versions"] if not v["active"]]
        r = c.post(f"/tasks/{task}/activate", json={"version": versions[seed % len(versions)]})
    else:
        r = c.post(f"/tasks/{task}/rollback")
    assert r.status_code in (200, 201), r.text
    return r.json()["version"]


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"not within {timeout:.0f} s: {what}")


def test_both_servers_seeded_one_store_at_once_and_serve_the_same_versions(pair):
    tasks_a = {t["name"]: t["active"] for t in pair.a.client.get("/tasks").json()["tasks"]}
    tasks_b = {t["name"]: t["active"] for t in pair.b.client.get("/tasks").json()["tasks"]}
    assert tasks_a == tasks_b and {"sst2", "mrpc", "stsb"} <= set(tasks_a)
    assert answered_version(pair.a, "sst2") == answered_version(pair.b, "sst2") == tasks_a["sst2"]


@pytest.mark.parametrize("op", ["upload", "activate", "rollback"])
def test_a_change_through_either_server_is_answered_by_the_other_within_a_second(pair, op):
    task = f"scale-{op}"
    for seed in range(3):  # versions to activate and roll back between, made through A
        change(pair.a, "upload", task, 100 + seed)
    for x in (pair.a, pair.b):
        seconds_until_answered(x, task, change(pair.a, "upload", task, 200), limit=5)  # both have it resident
    took = {}
    for round_ in range(3):
        for writer, reader in (("a", "b"), ("b", "a")):
            seed = 300 + 10 * round_ + len(took)
            if op == "rollback":  # something to roll back to, live on both first
                seconds_until_answered(pair.server(reader), task, change(pair.server(writer), "upload", task, seed))
            version = change(pair.server(writer), op, task, seed)
            took[f"{writer}->{reader} #{round_}"] = seconds_until_answered(pair.server(reader), task, version)
    late = {k: round(v, 3) for k, v in took.items() if v > BOUND_S}
    assert not late, f"{op}: answered later than {BOUND_S} s: {late} (median {statistics.median(took.values()):.3f} s)"


def test_s3_down_while_serving_degrades_then_recovers_without_a_restart(pair):
    a, b, proxy = pair.a, pair.b, pair.proxy
    serving = answered_version(b, "sst2")
    pid = b.proc.pid
    proxy.down = True
    try:
        ready = wait_for(lambda: (r := b.client.get("/readyz").json())["status"] == "degraded" and r, 20,
                         "B's /readyz reports the store as degraded")
        assert ready["store"].startswith("unavailable: ") and proxy.endpoint in ready["store"]
        assert [answered_version(b, "sst2") for _ in range(10)] == [serving] * 10  # resident tasks go on
        for call in (lambda: b.client.put("/tasks/scale-down", content=variant("scale-down", 1)),
                     lambda: b.client.post("/tasks/sst2/rollback"), lambda: b.client.get("/tasks")):
            r = call()
            assert r.status_code == 503 and r.headers["Retry-After"] == "1", r.text
            assert "unavailable" in r.json()["detail"] and BUCKET in r.json()["detail"], r.text
        missed = change(a, "upload", "scale-down", 2)  # made through A while B cannot see the store
    finally:
        proxy.down = False
    wait_for(lambda: (r := b.client.get("/readyz").json())["status"] == "ready" and r["store"] == "ok", 20,
             "B's /readyz is ready again")
    assert b.proc.poll() is None and b.proc.pid == pid  # the same process: nothing restarted it
    assert seconds_until_answered(b, "scale-down", missed, limit=5) < 5  # caught up with what it missed
    again = change(b, "upload", "scale-down", 3)  # and admin calls work again
    assert seconds_until_answered(a, "scale-down", again) < BOUND_S


START_FAILURES = {  # case -> (endpoint, bucket, access key); None: the real server's
    "unreachable endpoint": ("nothing listens", None, None),
    "missing bucket": (None, "no-such-bucket-bitfit", None),
}  # refused credentials and the rest: test_store_s3.py, on the store itself


def test_a_store_that_cannot_be_opened_stops_bitfit_serve_naming_endpoint_and_bucket(seaweedfs):
    runs = {}
    for case, (endpoint, bucket, key) in START_FAILURES.items():  # all at once: each loads the backbone first
        endpoint = f"http://127.0.0.1:{free_port()}" if endpoint else seaweedfs.env.endpoint
        bucket = bucket or BUCKET
        env = ServeProcess.inherited() | s3_variables(endpoint, key or KEY, SECRET)
        argv = [*bitfit_command(), "serve", "--store", f"s3://{bucket}/p", "--port", str(free_port()), "--no-seed"]
        runs[case] = (endpoint, bucket, subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL,
                                                         stderr=subprocess.PIPE, text=True))
    for case, (endpoint, bucket, proc) in runs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, f"{case}: {err}"
        message = err.strip().splitlines()[-1]
        assert message.startswith("bitfit serve: error: cannot open the store"), f"{case}: {message}"
        assert endpoint in message and bucket in message, f"{case}: {message}"
