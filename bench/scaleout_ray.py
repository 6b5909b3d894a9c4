"""The Ray half of bench/scaleout.py, run by it inside a loopback-only network namespace (tests/netns.py):
Ray's proxy against uvicorn directly, 1 replica against 2 on 2 nodes, and model multiplexing off against on.
Writes its measurements as JSON (`--out`); bench/scaleout.py renders them.

Cores (the machine has two): the head node (GCS, Serve's controller and proxy) and the load generator are pinned
to core 0; node 1, which holds the first replica, to core 1; node 0, added for the second replica, to core 0. So
the first replica has a core to itself, and the second shares its core with the proxy and the load generator;
their CPU time is measured and reported beside the throughput, so the reader can see what that share cost.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import httpx  # noqa: E402
import ray_cluster as rc  # noqa: E402
from s3_server import BUCKET, KEY, SECRET, SeaweedFS, new_prefix  # noqa: E402
from serve_process import TOKEN, ServeProcess, s3_variables, variant  # noqa: E402

WORDS = "a gripping beautifully acted film that never quite finds its footing yet still moves".split()
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def texts(n: int, rng: random.Random) -> list[str]:
    return [" ".join(rng.choices(WORDS, k=rng.randint(6, 14))) for _ in range(n)]


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (FileNotFoundError, IndexError, ValueError):
            pass
    return total


def pids_named(fragment: str) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if fragment in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    out.append(int(entry.name))
            except OSError:
                pass
    return out


def latency(url: str, n: int, rng: random.Random) -> list[float]:
    """Sequential /predict of one input; milliseconds."""
    out = []
    with httpx.Client(base_url=url, timeout=30) as c:
        for _ in range(n):
            body = {"inputs": texts(1, rng)}
            start = time.perf_counter()
            r = c.post("/predict", params={"task": "sst2"}, json=body)
            out.append((time.perf_counter() - start) * 1e3)
            assert r.status_code == 200, r.text
    return out


def load(url: str, seconds: float, concurrency: int, inputs: int, tasks: list[str], multiplex: bool,
         seed: int = 0, servers: list[int] | None = None) -> dict:
    """`concurrency` clients, each sending /predict with `inputs` texts for a random task, for `seconds`; with
    the CPU seconds the servers (`servers`, default: Ray's replicas), the proxy and this process used meanwhile."""
    lock, done, errors, lat = threading.Lock(), [0], [0], []
    stop = time.perf_counter() + seconds

    def client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        with httpx.Client(base_url=url, timeout=60) as c:
            while time.perf_counter() < stop:
                task = rng.choice(tasks)
                headers = {"serve_multiplexed_model_id": task} if multiplex else {}
                start = time.perf_counter()
                try:
                    r = c.post("/predict", params={"task": task}, json={"inputs": texts(inputs, rng)},
                               headers=headers)
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                with lock:
                    if ok:
                        done[0] += inputs
                        lat.append((time.perf_counter() - start) * 1e3)
                    else:
                        errors[0] += 1

    replicas, proxy = servers or pids_named("ray::ServeReplica"), pids_named("ray::ProxyActor")
    before = {"replicas": cpu_seconds(replicas), "proxy": cpu_seconds(proxy), "generator": cpu_seconds([os.getpid()])}
    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    after = {"replicas": cpu_seconds(replicas), "proxy": cpu_seconds(proxy), "generator": cpu_seconds([os.getpid()])}
    return {"inputs_per_s": done[0] / wall, "requests": len(lat), "inputs": inputs, "errors": errors[0],
            "p50_ms": statistics.median(lat) if lat else None,
            "p99_ms": statistics.quantiles(lat, n=100)[98] if len(lat) > 1 else None, "wall_s": wall,
            "cpu_s": {k: after[k] - before[k] for k in after}}


def batch_modes(url: str, replicas: int) -> dict[str, float]:
    """Forward passes by mode (swap: one task; gather/group: several), summed over every replica's /metrics."""
    seen, totals = set(), {}
    with httpx.Client(base_url=url, timeout=30) as c:
        for _ in range(200):
            r = c.get("/metrics")
            name = r.headers.get("x-bitfit-replica")
            if name in seen:
                continue
            seen.add(name)
            for line in r.text.splitlines():
                if line.startswith("bitfit_batches_total{"):
                    mode = line.split('mode="', 1)[1].split('"', 1)[0]
                    totals[mode] = totals.get(mode, 0.0) + float(line.rsplit(" ", 1)[1])
            if len(seen) == replicas:
                break
    return totals


def minus(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def deploy(args: dict[str, str]) -> None:
    from ray import serve

    from server.ray_app import build

    serve.run(build(args), name=rc.APP, route_prefix="/")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--workdir", required=True, type=Path)
    p.add_argument("--samples", type=int, default=200, help="sequential requests per side for the proxy overhead")
    p.add_argument("--seconds", type=float, default=20.0, help="length of each throughput run")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--inputs", type=int, default=8, help="texts per request in the throughput runs")
    p.add_argument("--tasks", type=int, default=8, help="tasks in the mixed load of the multiplexing runs")
    a = p.parse_args()
    a.workdir.mkdir(parents=True, exist_ok=True)
    rng, out = random.Random(0), {"settings": vars(a) | {"out": str(a.out), "workdir": str(a.workdir)}}
    t0 = time.perf_counter()

    def say(what: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f} s] {what}", flush=True)

    with SeaweedFS(a.workdir / "s3") as s3:
        env = s3_variables(s3.env.endpoint, KEY, SECRET)
        os.environ.update(env)
        os.environ["BITFIT_ADMIN_TOKEN"] = TOKEN
        location = f"s3://{BUCKET}/{new_prefix('bench')}"
        port = rc.SERVE_PORT
        url = f"http://{rc.LOOPBACK}:{port}"
        with rc.cluster(a.workdir, nodes=2, cpus_per_node=1, http_port=port, pin=[{0}, {1}],
                        head_cpus=0) as c:
            os.sched_setaffinity(0, {0})  # the load generator (this process) stays on core 0
            say("cluster up: head (core 0, no replicas), node 1 (core 1)")
            common = {"store": location, "num_cpus": "1", "threads": "1"}
            deploy(common | {"replicas": "1"})
            say("1 replica deployed")
            tasks = [f"mx-{i}" for i in range(a.tasks)]
            with httpx.Client(base_url=url, timeout=60) as admin:
                for i, task in enumerate(tasks):
                    assert admin.put(f"/tasks/{task}", content=variant(task, i), headers=AUTH).status_code == 201
            direct = ServeProcess(location, env | {"BITFIT_THREADS": "1"}, log=a.workdir / "direct.log", cpus={1})
            direct.wait_ready()
            say("uvicorn server up on core 1")
            ray_ms, direct_ms, proxy_cpu, proxy = [], [], 0.0, pids_named("ray::ProxyActor")
            for _ in range(5):  # side by side, in turns
                before = cpu_seconds(proxy)
                ray_ms += latency(url, a.samples // 5, rng)
                proxy_cpu += cpu_seconds(proxy) - before
                direct_ms += latency(direct.url, a.samples // 5, rng)
            out["overhead"] = {"ray_ms": ray_ms, "direct_ms": direct_ms, "proxy_cpu_s": proxy_cpu}
            out["direct_load"] = load(direct.url, a.seconds, a.concurrency, a.inputs, ["sst2"], False,
                                      servers=[direct.proc.pid])
            direct.stop()
            say("proxy overhead measured")
            out["one"] = load(url, a.seconds, a.concurrency, a.inputs, ["sst2"], False)
            say("1 replica: throughput")
            rc.add_node(c, cores={0})
            deploy(common | {"replicas": "2"})
            out["placement_2"] = rc.replicas_seen(url, want=2)
            say("2 replicas deployed")
            out["two"] = load(url, a.seconds, a.concurrency, a.inputs, ["sst2"], False)
            say("2 replicas: throughput")
            before = batch_modes(url, 2)
            out["mixed_plain"] = load(url, a.seconds, a.concurrency, 1, tasks, False, seed=1)
            out["mixed_plain_modes"] = minus(batch_modes(url, 2), before)
            say("2 replicas: mixed tasks, routed by load")
            deploy(common | {"replicas": "2", "multiplex": "true", "multiplex_tasks": str(max(1, a.tasks // 2))})
            rc.replicas_seen(url, want=2)
            load(url, 3.0, a.concurrency, 1, tasks, True, seed=3)  # warm-up: the router learns who holds what
            before = batch_modes(url, 2)
            out["mixed_multiplex"] = load(url, a.seconds, a.concurrency, 1, tasks, True, seed=1)
            out["mixed_multiplex_modes"] = minus(batch_modes(url, 2), before)
            say("2 replicas: mixed tasks, routed by task (multiplexing)")
    a.out.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
