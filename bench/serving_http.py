"""HTTP parts of the serving benchmark: real `bitfit serve` processes on free loopback ports, httpx clients.

Every load phase sends a bounded number of requests (one input each) and stops by itself; servers are
started with `subprocess.Popen` and stopped by their own pid when the benchmark leaves the context.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
TOKEN = "bench-token"


def store_read_ms(root: Path, spec, read: str = "active_versions", *args, reps: int = 3) -> float:
    """Median milliseconds of one `BiasStore` read on this store (default: `active_versions()`, the
    whole-store scan every server-side sync does; `"task", NAME`: one task's state)."""
    from bias_store import BiasStore

    fn, times = getattr(BiasStore(root, spec), read), []
    for _ in range(reps):
        start = time.perf_counter()
        fn(*args)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fill_store(root: Path, spec, bias_sets: Sequence) -> float:
    """Put every bias set into a fresh store (task name = the set's task); returns the seconds it took."""
    from bias_store import BiasStore

    store = BiasStore(root, spec)
    start = time.perf_counter()
    for s in bias_sets:
        store.put(s.task, s.to_bytes())
    return time.perf_counter() - start


@contextmanager
def bitfit_server(store: Path, log: Path, *, threads: int, group_max_tasks: int = 1, max_batch: int = 32,
                  seed: bool = False, prefix: Sequence[str] = (), env_extra: dict | None = None,
                  ) -> Iterator[tuple[str, subprocess.Popen]]:
    """`bitfit serve` as a separate process (uvicorn), configured through its BITFIT_* settings; `prefix` runs it
    under another command (e.g. `taskset -c 0`)."""
    port = free_port()
    env = {**os.environ, "BITFIT_STORE": str(store), "BITFIT_HOST": "127.0.0.1", "BITFIT_PORT": str(port),
           "BITFIT_THREADS": str(threads), "BITFIT_ADMIN_TOKEN": TOKEN, "BITFIT_SEED": str(seed).lower(),
           "BITFIT_GROUP_MAX_TASKS": str(group_max_tasks), "BITFIT_MAX_BATCH": str(max_batch),
           "BITFIT_MAX_QUEUED": "4096", "BITFIT_MAX_UPLOAD_BYTES": str(16 << 20)} | (env_extra or {})
    with open(log, "w") as out:
        proc = subprocess.Popen([*prefix, sys.executable, "-m", "bitfit_cli", "serve"], stdout=out,
                                stderr=subprocess.STDOUT, env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def wait_ready(url: str, proc: subprocess.Popen, log: Path, tasks: int, timeout: float = 600.0) -> float:
    """Block until /readyz says every task is resident; returns the seconds waited."""
    start = time.monotonic()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"bitfit serve exited ({proc.returncode}): {log.read_text()[-2000:]}")
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"bitfit serve not ready after {timeout:.0f} s: {log.read_text()[-2000:]}")
        try:
            r = httpx.get(f"{url}/readyz", timeout=5)
            if r.status_code == 200 and r.json().get("resident", 0) >= tasks:
                return time.monotonic() - start
        except httpx.TransportError:
            pass
        time.sleep(0.25)


def rss_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def batch_stats(url: str) -> dict:
    """Forward passes and mean inputs per pass, per mode, from the server's Prometheus metrics (cumulative)."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    sums, counts = {}, {}
    for line in text.splitlines():
        for suffix, into in (("_sum", sums), ("_count", counts)):
            if line.startswith(f"bitfit_batch_size{suffix}{{"):
                mode = line.split('mode="', 1)[1].split('"', 1)[0]
                into[mode] = float(line.rsplit(" ", 1)[1])
    return {m: {"batches": int(counts[m]), "mean_inputs": sums.get(m, 0.0) / counts[m]} for m in counts if counts[m]}


# -- load ----------------------------------------------------------------------------------------------------

async def _post(client: httpx.AsyncClient, task: str, text: str) -> dict:
    r = await client.post("/predict", params={"task": task}, json={"inputs": [text]})
    if r.status_code != 200:
        raise RuntimeError(f"POST /predict?task={task}: {r.status_code} {r.text[:300]}")
    return r.json()


async def _closed_loop(url: str, requests: Sequence[tuple[str, str]], concurrency: int) -> tuple[float, list[float]]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    latencies: list[float] = []
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
        queue = list(reversed(requests))

        async def worker():
            while queue:
                task, text = queue.pop()
                t0 = time.perf_counter()
                await _post(client, task, text)
                latencies.append(time.perf_counter() - t0)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - start, latencies


def closed_loop(url: str, requests: Sequence[tuple[str, str]], concurrency: int) -> float:
    """Sequences per second with `concurrency` clients, each sending its next request when answered."""
    seconds, _ = asyncio.run(_closed_loop(url, requests, concurrency))
    return len(requests) / seconds


async def _open_loop(url: str, requests: Sequence[tuple[str, str]], rate: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
        # warm the connection pool so the first requests do not pay for TCP setup
        await asyncio.gather(*(client.get("/healthz") for _ in range(16)))
        start, due, tasks = time.perf_counter(), 0.0, []

        async def one(at: float, task: str, text: str) -> float:
            await _post(client, task, text)
            return time.perf_counter() - (start + at)  # from when it was due: no coordinated omission

        for task, text in requests:
            due += rng.expovariate(rate)
            delay = start + due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(due, task, text)))
        return list(await asyncio.gather(*tasks))


def open_loop(url: str, requests: Sequence[tuple[str, str]], rate: float, seed: int = 0) -> dict:
    """Latencies with Poisson arrivals at `rate` requests per second (one input each)."""
    lat = sorted(asyncio.run(_open_loop(url, requests, rate, seed)))
    q = lambda p: lat[min(len(lat) - 1, int(round(p * (len(lat) - 1))))]  # noqa: E731
    return {"rate": rate, "requests": len(lat), "p50_ms": q(0.50) * 1e3, "p90_ms": q(0.90) * 1e3,
            "p99_ms": q(0.99) * 1e3, "max_ms": lat[-1] * 1e3, "mean_ms": statistics.fmean(lat) * 1e3}


def upload_to_live(url: str, task: str, payloads: Sequence[bytes], probe_text: str) -> dict:
    """For each payload: PUT it (activate), then predict until the answer carries the new version.

    put_ms: request sent -> 201 received (validated, stored, fsynced, loaded on the device);
    live_ms: 201 received -> first prediction answered by the new version;
    predict_ms: the same prediction just before the upload (what live_ms costs when nothing waits);
    total_ms: request sent -> that prediction.
    """
    put, live, total, tries, predict = [], [], [], [], []
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/octet-stream"}
    with httpx.Client(base_url=url, timeout=120) as client:
        client.post("/predict", params={"task": task}, json={"inputs": [probe_text]})  # task exists, connection warm
        for data in payloads:
            t0 = time.perf_counter()
            client.post("/predict", params={"task": task}, json={"inputs": [probe_text]}).raise_for_status()
            predict.append((time.perf_counter() - t0) * 1e3)  # the same prediction before the upload, for scale
            t0 = time.perf_counter()
            r = client.put(f"/tasks/{task}", content=data, headers=headers)
            t1 = time.perf_counter()
            if r.status_code != 201:
                raise RuntimeError(f"PUT /tasks/{task}: {r.status_code} {r.text[:300]}")
            version, n = r.json()["version"], 0
            while True:
                n += 1
                p = client.post("/predict", params={"task": task}, json={"inputs": [probe_text]})
                if p.status_code == 200 and p.json()["version"] == version:
                    break
                if n > 1000:
                    raise RuntimeError(f"version {version} of {task} never answered")
            t2 = time.perf_counter()
            put.append((t1 - t0) * 1e3)
            live.append((t2 - t1) * 1e3)
            total.append((t2 - t0) * 1e3)
            tries.append(n)
    med = statistics.median
    return {"reps": len(payloads), "predict_ms": med(predict), "put_ms": med(put), "live_ms": med(live),
            "total_ms": med(total),
            "total_max_ms": max(total), "predicts_until_live_max": max(tries)}
