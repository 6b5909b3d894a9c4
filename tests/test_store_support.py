"""Helpers shared by the store tests: a tiny backbone layout, valid bias sets, raw safetensors, snapshots.

Importable by name from the test modules and from spawned child processes (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save as st_save_numpy

from bitfit.bias_set import BiasSet
from bitfit.layout import BiasLayout, layout_of
from bitfit.spec import ServingSpec

HIDDEN = 32  # tiny_config("bert").hidden_size


@functools.lru_cache(maxsize=4)
def tiny_layout(seed: int = 0) -> BiasLayout:
    """The layout of a tiny BERT; another seed gives the same shapes with another fingerprint."""
    from conftest import tiny_model

    return layout_of(tiny_model("bert", seed=seed))


def tiny_spec(seed: int = 0) -> ServingSpec:
    """The serving spec of the tiny BERT (it has a pooler)."""
    return ServingSpec.for_layout(tiny_layout(seed), HIDDEN, has_pooler=True)


def make_bias_set(
    layout: BiasLayout, task: str = "sst2", labels=("neg", "pos"), seed: int = 0, **fields
) -> BiasSet:
    g = torch.Generator().manual_seed(seed)
    n = len(labels) or 1
    return BiasSet(
        task=task,
        delta=torch.randn(layout.size, generator=g) * 0.01,
        head={"out.weight": torch.randn(n, HIDDEN, generator=g), "out.bias": torch.randn(n, generator=g)},
        labels=list(labels),
        fingerprint=layout.fingerprint,
        metrics=fields.pop("metrics", {"accuracy": 0.5 + seed / 1000}),
        created_at=fields.pop("created_at", "2026-01-01T00:00:00+00:00"),  # same seed, same bytes
        **fields,
    )


def valid_bytes(layout: BiasLayout, task: str = "sst2", seed: int = 0, **kw) -> bytes:
    return make_bias_set(layout, task, seed=seed, **kw).to_bytes()


def parts(layout: BiasLayout, task: str = "sst2", seed: int = 0, **kw) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """A valid bias set as (numpy tensors, metadata), to be broken and re-saved with `raw`."""
    bs = make_bias_set(layout, task, seed=seed, **kw)
    return {k: v.numpy().copy() for k, v in bs.tensors().items()}, bs.metadata()


def raw(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None) -> bytes:
    return st_save_numpy(tensors, metadata=metadata)


def with_header(header: dict | bytes, data: bytes = b"") -> bytes:
    """A hand-made safetensors file: 8-byte little-endian length, header, data."""
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return len(h).to_bytes(8, "little") + h + data


def snapshot(root: Path) -> dict[str, bytes]:
    """Every entry under root: file path -> bytes, directory path -> b"<dir>"."""
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(root.rglob("*"))}


class Backend:
    """One store location of either backend, for contract tests that run on both (`backend` fixtures)."""

    def __init__(self, kind: str, location: str, s3_env=None):
        self.kind, self.location, self.s3 = kind, location, s3_env

    def open(self, spec=None, **kw):
        from bias_store import open_store

        return open_store(self.location, tiny_spec() if spec is None else spec, **kw)

    def snapshot(self) -> dict[str, bytes]:
        """Every file (directory) or object (S3) of the store with its bytes."""
        if self.kind == "dir":
            return snapshot(Path(self.location))
        from s3_server import BUCKET, objects_under

        return objects_under(self.s3.client(), BUCKET, self.s3.prefix)

    def damage(self, store, task: str, version: str) -> None:
        """Flip the last byte of a stored version's bytes, behind the store's back."""
        if self.kind == "dir":
            path = Path(self.location) / task / "versions" / f"{version}.safetensors"
            data = bytearray(path.read_bytes())
            data[-1] ^= 0xFF
            path.write_bytes(bytes(data))
            return
        from s3_server import BUCKET

        key = f"{self.s3.prefix}/" + next(v["object"] for v in store._state(task)["versions"] if v["version"] == version)
        client = self.s3.client()
        data = bytearray(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
        data[-1] ^= 0xFF
        client.put_object(Bucket=BUCKET, Key=key, Body=bytes(data))


def backend_for(request, tmp_path) -> Backend:
    """The `Backend` of a test parametrised with "dir" / "s3" (the latter starts the real S3 server)."""
    if request.param == "dir":
        return Backend("dir", str(tmp_path / "store"))
    env = request.getfixturevalue("s3_env")
    return Backend("s3", env.location, env)


# ---- a writer in a loop, killed: shared by the directory and S3 crash tests ----

TASKS = ("sst2", "cola")
State = dict[str, tuple[frozenset, "str | None"]]  # task -> (versions, active)


def churn(location: str, spec, blobs: dict[str, list[bytes]], log_path: str, seed: int) -> None:
    """Loop uploads, activations and deletes forever, logging each op before it starts and once acknowledged."""
    import random

    from bias_store import TaskNotFound, open_store
    from bias_store.store import version_id

    rng = random.Random(seed)
    store = open_store(location, spec)
    log = open(log_path, "a", buffering=1)  # one write(2) per line: a line survives SIGKILL once written

    def run(op: str, fn, *args, **kw):
        log.write(f"begin {op}\n")
        fn(*args, **kw)
        log.write(f"ok {op}\n")

    while True:
        task = rng.choice(TASKS)
        try:
            info = store.task(task)
        except TaskNotFound:
            info = None
        r = rng.random()
        if info is None or r < 0.5:
            data, act = rng.choice(blobs[task]), rng.random() < 0.7
            run(f"put {task} {version_id(data)} {int(act)}", store.put, task, data, activate=act)
        elif r < 0.85:
            v = rng.choice(info.versions).version
            run(f"activate {task} {v}", store.activate, task, v)
        else:
            inactive = [x.version for x in info.versions if not x.active and info.active]
            if inactive:
                v = rng.choice(inactive)
                run(f"delete {task} {v}", store.delete_version, task, v)


def apply_op(state: State, op: str) -> State:
    """The store's documented effect of one logged op, on the model state."""
    kind, task, v, *rest = op.split()
    state = dict(state)
    versions, active = state.get(task, (frozenset(), None))
    if kind == "put":
        versions, active = versions | {v}, v if rest == ["1"] else active
    elif kind == "activate":
        active = v
    elif kind == "delete":
        versions = versions - {v}
    if versions:
        state[task] = (versions, active)
    else:
        state.pop(task, None)
    return state


def replay(log_text: str, state: State) -> tuple[State, "str | None", int]:
    """(state after every acknowledged op, the op in flight at the kill or None, number of acks)."""
    inflight, acks = None, 0
    for line in log_text.splitlines(keepends=True):
        if not line.endswith("\n"):
            break
        word, op = line.rstrip("\n").split(" ", 1)
        if word == "begin":
            inflight = op
        else:
            assert op == inflight, f"ack {op!r} for {inflight!r}"
            state, inflight, acks = apply_op(state, op), None, acks + 1
    return state, inflight, acks


def sigkill_rounds(location: str, blobs, observe, workdir: Path, *, min_rounds: int, min_acks: int,
                   time_cap: float, window: tuple[float, float] = (0.02, 0.12)) -> tuple[int, int, int]:
    """Fork `churn` on `location`, SIGKILL it `window` seconds into its work, and check that `observe()` (which opens
    the store afresh) finds every acknowledged op, or that plus the op in flight; again and again.
    Returns (kills, acknowledged ops, kills that landed inside an op)."""
    import multiprocessing as mp
    import os
    import random
    import signal
    import time

    ctx, rng = mp.get_context("fork"), random.Random(1234)
    state: State = {}
    rounds = acks = midway = 0
    start = time.monotonic()
    while (rounds < min_rounds or acks < min_acks) and rounds < 300 and time.monotonic() - start < time_cap:
        log_path = workdir / f"log{rounds}"
        child = ctx.Process(target=churn, args=(location, tiny_spec(), blobs, str(log_path), rounds))
        child.start()
        began = time.monotonic()  # kill inside the operations, not while the child is still starting
        while not (log_path.exists() and log_path.read_text()) and time.monotonic() - began < 5.0:
            time.sleep(0.002)
        time.sleep(rng.uniform(*window))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        assert child.exitcode == -signal.SIGKILL
        acked, inflight, n = replay(log_path.read_text() if log_path.exists() else "", state)
        observed = observe()
        allowed = [acked] + ([apply_op(acked, inflight)] if inflight else [])
        assert observed in allowed, f"round {rounds}: in flight {inflight!r}\n{observed}\nnot in\n{allowed}"
        state, rounds, acks, midway = observed, rounds + 1, acks + n, midway + bool(inflight)
    return rounds, acks, midway
