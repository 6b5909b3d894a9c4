"""A loopback-only network namespace for the Ray cluster tests and benchmarks.

Ray rewrites 127.0.0.1 to the machine's own address when it starts a node, so on an ordinary network its nodes,
proxy and replicas would listen on, and talk over, the machine's real interface. Inside a namespace that has only
`lo` (up), the only address there is 127.0.0.1: everything stays on loopback. Everything the cluster needs (the S3
server included) must run inside the namespace too, since its 127.0.0.1 is not the host's. Needs root (`ip netns`),
as CI has.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager


class NamespaceUnavailable(RuntimeError):
    pass


@contextmanager
def loopback_namespace(prefix: str = "bitfit") -> Iterator[str]:
    """A fresh namespace with only `lo`, up; deleted afterwards (with anything still running in it killed)."""
    if os.geteuid() != 0:
        raise NamespaceUnavailable("the Ray cluster runs in a loopback-only network namespace, which needs root "
                                   "(ip netns add); run as root, as CI does")
    name = f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        raise NamespaceUnavailable(f"ip netns add {name} failed: {made.stderr.strip()}")
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        _kill_left_in(name)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _kill_left_in(name: str) -> None:
    """Processes still in the namespace (a crashed test's Ray workers): found by namespace, killed by PID."""
    pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), 9)
        except (ProcessLookupError, ValueError):
            pass


def run_inside(name: str, argv: Sequence[str], *, timeout: float, env: dict[str, str] | None = None,
               log=None) -> subprocess.CompletedProcess:
    """Run `argv` in the namespace; its output goes to `log` (a file) or is captured."""
    return subprocess.run(["ip", "netns", "exec", name, *argv], timeout=timeout, env=env, text=True,
                          stdin=subprocess.DEVNULL, stdout=log if log else subprocess.PIPE,
                          stderr=subprocess.STDOUT)
