"""`bitfit serve` as a real process, for the scale-out tests and benchmarks: started on a free loopback port with
the environment it is given (the AWS_* variables of an S3 store), waited for until /readyz answers, and stopped by
its PID (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
TOKEN = "scaleout-test-token"


def variant(task: str, seed: int) -> bytes:
    """A valid MiniLM bias set for `task`, distinct for each seed: the shipped sst2 set with its deltas nudged
    (so the test process need not load the backbone to make uploads)."""
    import torch

    from bitfit.bias_set import BiasSet

    bias_set = BiasSet.from_bytes((REPO / "server" / "seed" / "sst2.safetensors").read_bytes())
    g = torch.Generator().manual_seed(seed)
    bias_set.task = task
    bias_set.delta = bias_set.delta + torch.randn(bias_set.delta.shape, generator=g) * 0.05
    return bias_set.to_bytes()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def s3_variables(endpoint: str, key: str, secret: str, region: str = "us-east-1") -> dict[str, str]:
    """The standard variables for an S3 store, and no profile or config file that could interfere."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_REGION": region, "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}


def bitfit_command() -> list[str]:
    return [sys.executable, "-m", "bitfit_cli"]


class ServeProcess:
    """One `bitfit serve --store LOCATION` on 127.0.0.1; `url`, `client` (admin token set), `stop()`.

    The process sees no AWS_* or BITFIT_* variable of this one: only those in `env`."""

    def __init__(self, store: str, env: dict[str, str], *, extra: list[str] = (), log: Path | None = None,
                 cpus: set[int] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [*bitfit_command(), "serve", "--store", store, "--port", str(self.port), "--token", TOKEN, *extra]
        if cpus:  # pin the server (and its torch threads) to these cores: a benchmark's load generator stays off them
            args = ["taskset", "-c", ",".join(map(str, sorted(cpus))), *args]
        self.log = log
        out = open(log, "ab") if log else subprocess.DEVNULL
        self.proc = subprocess.Popen(args, env={**self.inherited(), **env}, cwd=REPO, stdin=subprocess.DEVNULL,
                                     stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.client = httpx.Client(base_url=self.url, timeout=30, headers={"Authorization": f"Bearer {TOKEN}"})

    @staticmethod
    def inherited() -> dict[str, str]:
        """This process's environment less every AWS_* and BITFIT_* variable."""
        return {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "BITFIT_"))}

    def wait_ready(self, timeout: float = 180.0) -> "ServeProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bitfit serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if self.client.get("/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"bitfit serve was not ready within {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 30) -> str:
        if not self.log or not Path(self.log).exists():
            return "(no log)"
        return "\n".join(Path(self.log).read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def start_all(store: str, env: dict[str, str], n: int, logs: Path, **kw) -> list[ServeProcess]:
    """`n` servers on one store, started together (they load the backbone at the same time) and waited for."""
    procs = [ServeProcess(store, env, log=logs / f"serve-{i}.log", **kw) for i in range(n)]
    try:
        for p in procs:
            p.wait_ready()
    except Exception:
        for p in procs:
            p.stop()
        raise
    return procs
