"""Crash safety and concurrency with real processes: SIGKILL mid-write, and two writers on one directory."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
from pathlib import Path

import pytest
from test_store_support import TASKS, State, sigkill_rounds, tiny_layout, tiny_spec, valid_bytes

from bias_store import BiasStore, validate
from bias_store.store import version_id

def _observe(store: BiasStore, blobs: dict[str, list[bytes]]) -> State:
    """The store's state, after checking every listed version reads back intact and nothing stray is left."""
    by_id = {version_id(b): b for bs in blobs.values() for b in bs}
    state = {}
    for t in store.tasks():
        ids = frozenset(v.version for v in t.versions)
        for v in ids:
            assert version_id(store.read(t.name, v)) == v and store.read(t.name, v) == by_id[v]
        assert t.active is None or t.active in ids
        on_disk = {p.name for p in (store.root / t.name / "versions").iterdir()}
        assert on_disk == {v + ".safetensors" for v in ids}
        state[t.name] = (ids, t.active)
    stray = [p for p in store.root.rglob("*") if p.name.startswith((".tmp-", ".trash-", ".dirty"))]
    assert not stray, stray
    return state


def test_sigkill_during_uploads_and_activations_leaves_old_or_new_state(tmp_path):
    layout, spec, root = tiny_layout(), tiny_spec(), tmp_path / "store"
    blobs = {t: [valid_bytes(layout, task=t, seed=i) for i in range(4)] for t in TASKS}
    # 30 kills, and more until 30 operations were acknowledged (a loaded machine does fewer per kill)
    rounds, acks, midway = sigkill_rounds(str(root), blobs, lambda: _observe(BiasStore(root, spec), blobs), tmp_path,
                                          min_rounds=30, min_acks=30, time_cap=60.0)
    print(f"{rounds} kills, {acks} acknowledged ops, {midway} kills inside an operation")
    assert rounds >= 20 and acks >= 30, (rounds, acks)
    assert midway >= rounds // 2, f"only {midway} of {rounds} kills landed inside an operation"


CRASHED = 77
INTERCEPTED = ("fsync", "replace", "rename", "unlink", "mkdir", "rmdir")  # every step that changes the disk


def _run_until_step(root: Path, spec, op, k: int) -> int:
    """Run `op(store)` in a forked child that dies (os._exit) at its k-th file-system step; its exit code."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            store = BiasStore(root, spec)
            count = [0]

            def wrap(fn):
                def step(*args, **kw):
                    if count[0] == k:
                        os._exit(CRASHED)
                    count[0] += 1
                    return fn(*args, **kw)

                return step

            for name in INTERCEPTED:
                setattr(os, name, wrap(getattr(os, name)))
            op(store)
            os._exit(0)
        except BaseException:
            os._exit(3)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _full_state(store: BiasStore, blobs) -> tuple:
    """(task, active, rollback history, versions) per task, after the checks of `_observe`."""
    _observe(store, blobs)
    states = {t.name: json.loads((store.root / t.name / "STATE.json").read_text()) for t in store.tasks()}
    return tuple(
        (t, s["active"], tuple(s["history"]), tuple(v["version"] for v in s["versions"]))
        for t, s in sorted(states.items())
    )


# One of each kind of commit: a version file plus STATE, STATE alone, STATE then unlink, a directory rename.
SCENARIOS = [
    ("put-new-version", lambda s, b: s.put("sst2", b["sst2"][2])),
    ("put-new-task", lambda s, b: s.put("mnli", b["mnli"][0])),
    ("activate", lambda s, b: s.activate("sst2", version_id(b["sst2"][0]))),
    ("rollback", lambda s, b: s.rollback("sst2")),
    ("force-delete-active-version", lambda s, b: s.delete_version("sst2", version_id(b["sst2"][1]), force=True)),
    ("delete-task", lambda s, b: s.delete_task("sst2")),
]


@pytest.mark.parametrize("op", [s[1] for s in SCENARIOS], ids=[s[0] for s in SCENARIOS])
def test_a_crash_at_every_write_step_leaves_old_or_new_state(tmp_path, op):
    layout, spec = tiny_layout(), tiny_spec()
    blobs = {t: [valid_bytes(layout, task=t, seed=i) for i in range(4)] for t in ("sst2", "cola", "mnli")}
    template = BiasStore(tmp_path / "template", spec)
    template.put("sst2", blobs["sst2"][0])
    template.put("sst2", blobs["sst2"][1])  # active, with sst2[0] on the rollback history
    template.put("cola", blobs["cola"][0])
    old, g_old = _full_state(template, blobs), template.generation()
    shutil.copytree(template.root, tmp_path / "done")
    op(BiasStore(tmp_path / "done", spec), blobs)
    new = _full_state(BiasStore(tmp_path / "done", spec), blobs)
    assert new != old

    outcomes = []
    for k in range(200):
        root = tmp_path / f"k{k}"
        shutil.copytree(template.root, root)
        code = _run_until_step(root, spec, lambda s: op(s, blobs), k)
        assert code in (CRASHED, 0), f"child failed at step {k} with exit code {code}"
        reopened = BiasStore(root, spec)  # recovery runs here
        seen = _full_state(reopened, blobs)
        assert seen in (old, new), f"crash at step {k} left a third state: {seen}"
        if seen == new:
            assert reopened.generation() > g_old, f"crash at step {k}: new state but generation did not move"
        outcomes.append(seen == new)
        shutil.rmtree(root)
        if code == 0:
            break
    assert code == 0 and outcomes[0] is False and outcomes[-1] is True and len(outcomes) >= 4


def _upload(root: str, spec, jobs: list[tuple[str, bytes]], barrier, out) -> None:
    store = BiasStore(root, spec)
    barrier.wait()
    acked = []
    for i, (task, data) in enumerate(jobs):
        acked.append((task, store.put(task, data).version))
        if i % 3 == 2:  # activations interleave with the other writer's uploads
            store.activate(*acked[-2])
            acked.append(acked[-2])
    out.put(acked)


def test_two_processes_uploading_at_once_keep_every_acknowledged_version(tmp_path):
    layout, spec, root = tiny_layout(), tiny_spec(), tmp_path / "store"
    BiasStore(root, spec)
    shared_same = valid_bytes(layout, task="shared", seed=99)  # both upload these exact bytes
    jobs = {
        name: [(own, valid_bytes(layout, task=own, seed=s + i)) for i in range(8)]
        + [("shared", valid_bytes(layout, task="shared", seed=s + i)) for i in range(8)]
        + [("shared", shared_same)]
        for name, own, s in (("a", "alpha", 0), ("b", "beta", 100))
    }
    for name in jobs:  # interleave own-task and shared-task uploads
        j = jobs[name]
        jobs[name] = [x for pair in zip(j[:8], j[8:16]) for x in pair] + j[16:]
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_upload, args=(str(root), spec, jobs[n], barrier, out)) for n in jobs]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0

    store = BiasStore(root, spec)
    tasks = {t.name: t for t in store.tasks()}
    assert sorted(tasks) == ["alpha", "beta", "shared"]
    for acked in results:
        for task, v in acked:
            data = store.read(task, v)
            assert version_id(data) == v and validate(data, spec, max_bytes=2**20, task=task) == []
        own = acked[0][0]  # only this process writes it, so its last acknowledged version is active
        assert tasks[own].active == [v for t, v in acked if t == own][-1]
    assert len(tasks["shared"].versions) == 17  # 8 + 8 distinct, and the common bytes once
    assert tasks["shared"].active in {v for acked in results for t, v in acked if t == "shared"}
    for t in tasks.values():
        files = {p.name for p in (Path(root) / t.name / "versions").iterdir()}
        assert files == {v.version + ".safetensors" for v in t.versions}
