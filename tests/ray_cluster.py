"""A real Ray cluster of several nodes on one machine (`ray.cluster_utils.Cluster`), for code that already runs
inside a loopback-only network namespace (netns.py): start it, put bitfit-serve on it with the user's own command
(`serve run server.ray_app:build ...`), find and kill replicas, shut it all down.

Shut down only with serve.shutdown(), ray.shutdown() and cluster.shutdown(), never `ray stop`, which kills every
Ray process on the machine by name, other people's included.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
APP = "bitfit"
LOOPBACK = "127.0.0.1"

# Serve's proxy port: fixed, below the ephemeral range. A free ephemeral port picked before the cluster starts can be
# taken by one of Ray's own processes (they bind ephemeral ports) before the proxy binds it; the cluster runs in a
# private network namespace, so nothing else holds this one.
SERVE_PORT = 8000


@contextmanager
def cluster(workdir: Path, nodes: int = 2, cpus_per_node: float = 1, http_port: int = SERVE_PORT,
            pin: Sequence[set[int]] | None = None, head_cpus: float | None = None) -> Iterator[object]:
    """`nodes` Ray nodes (the first is the head; `head_cpus` CPUs, default `cpus_per_node`) and Serve's proxy on
    the head, at LOOPBACK:http_port.

    `pin`: for each node, the cores its processes (raylet, and the workers it starts) may run on.

    Ray's proxy prefers replicas on its own node; with the one proxy on the head (the nodes share 127.0.0.1, so
    only one can listen on the port) that would send nearly everything to the head's replica, so the preference
    is turned off here. With a proxy on every node behind a load balancer (deploy/ray/serve.yaml) it is right."""
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ["RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING"] = "0"  # inherited by the nodes, so by the proxy
    temp = Path(f"/tmp/bitfit-ray-{os.getpid()}")  # short: Ray's socket paths must fit in 107 bytes
    # Cluster() records the head's address in Ray's default temp dir (/tmp/ray) whatever temp_dir says, and does
    # not create that folder: on a machine that never ran Ray the head fails to start without it.
    from ray._common.utils import get_default_ray_temp_dir

    Path(get_default_ray_temp_dir()).mkdir(parents=True, exist_ok=True)
    c = None
    try:
        head = {**node_args(temp, cpus_per_node if head_cpus is None else head_cpus), "include_dashboard": False}
        c = Cluster(initialize_head=True, head_node_args=head)
        c.bitfit_temp, c.bitfit_pins = temp, {}
        pin_node(c, c.head_node, pin[0] if pin else None)
        for i in range(1, nodes):
            add_node(c, cpus_per_node, pin[i] if pin else None)
        ray.init(address=c.address, _node_ip_address=LOOPBACK, logging_level="WARNING", log_to_driver=False)
        serve.start(http_options={"host": LOOPBACK, "port": http_port, "location": "HeadOnly"})
        repin(c)  # workers the nodes started meanwhile (for the driver, Serve's controller and proxy)
        yield c
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            if c is not None:
                c.shutdown()
            shutil.rmtree(temp, ignore_errors=True)  # Ray's session logs and sockets


def node_args(temp: Path, cpus: float) -> dict:
    return {"node_ip_address": LOOPBACK, "num_cpus": cpus, "object_store_memory": 80 << 20, "temp_dir": str(temp)}


def descendants(pids: list[int]) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], list(pids)
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def pin_node(c, node, cores: set[int] | None) -> None:
    """Put a started node's processes, and every process they started, on `cores`; workers it starts later
    inherit its raylet's affinity. Pinned after starting, not before: Ray gives a new node 30 s to register,
    which a node confined to one busy core can miss."""
    if not cores:
        return
    c.bitfit_pins[node] = cores
    own = [info.process.pid for infos in node.all_processes.values() for info in infos if info.process]
    for pid in descendants(own):
        try:
            os.sched_setaffinity(pid, cores)
        except ProcessLookupError:
            pass


def repin(c) -> None:
    for node, cores in c.bitfit_pins.items():
        pin_node(c, node, cores)


def add_node(c, cpus: float = 1, cores: set[int] | None = None) -> None:
    start = time.perf_counter()
    node = c.add_node(**node_args(c.bitfit_temp, cpus))
    pin_node(c, node, cores)
    print(f"ray node added in {time.perf_counter() - start:.1f} s", flush=True)


def serve_run(address: str, args: dict[str, str], log: Path, timeout: float = 600) -> None:
    """Deploy with the user's command, `serve run --non-blocking server.ray_app:build key=value ...`, and wait
    until the application is RUNNING (serve run itself exits 0 even when the replicas fail to start)."""
    from ray import serve

    serve_cli = str(Path(sys.executable).with_name("serve"))
    argv = [serve_cli, "run", "--address", address, "--non-blocking", "--name", APP, "server.ray_app:build",
            *(f"{k}={v}" for k, v in args.items())]
    with open(log, "ab") as out:
        done = subprocess.run(argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = serve.status().applications.get(APP)
        if status is not None and status.status == "RUNNING":
            return
        if status is not None and status.status in ("DEPLOY_FAILED", "UNHEALTHY"):
            break
        time.sleep(0.5)
    raise RuntimeError(f"serve run exited {done.returncode}; application {APP!r} is "
                       f"{status.status if status else 'absent'}: {status.message if status else ''}; see {log}")


def replica_counts(deployment: str = "BitfitServe") -> dict[str, int]:
    """Replica states of the deployment, as Serve's controller reports them (e.g. {"RUNNING": 2})."""
    from ray import serve

    status = serve.status().applications[APP].deployments[deployment]
    return {str(k.value if hasattr(k, "value") else k): v for k, v in status.replica_states.items()}


def kill_replica(actor_name: str) -> None:
    """Kill one replica's actor, as a crash would; Serve's controller notices and starts a replacement."""
    import ray

    ray.kill(ray.get_actor(actor_name, namespace="serve"), no_restart=True)


def replicas_seen(url: str, want: int, timeout: float = 60) -> dict[str, str]:
    """Ask until `want` different replicas have answered; replica actor name -> node id."""
    seen: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=url, timeout=10) as c:
        while len(seen) < want and time.monotonic() < deadline:
            r = c.get("/readyz")
            if r.status_code == 200:
                seen[r.headers["x-bitfit-replica"]] = r.headers["x-bitfit-node"]
    return seen
