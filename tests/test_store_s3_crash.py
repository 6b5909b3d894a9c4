"""Crash safety and concurrency of the S3 backend with real processes on a real SeaweedFS: a writer dying before
each of its S3 writes, SIGKILL of a looping writer, and two processes writing one task at once."""

from __future__ import annotations

import multiprocessing as mp
import os

import pytest
from botocore.client import BaseClient
from s3_server import BUCKET, new_prefix
from test_store_support import TASKS, State, sigkill_rounds, tiny_layout, tiny_spec, valid_bytes

from bias_store import NothingToRollBack, open_store, validate
from bias_store.store import version_id

CRASHED = 77
WRITES = {"PutObject", "DeleteObject", "DeleteObjects", "CopyObject"}  # every request that changes the store
QUICK_OPEN = {"check_conditional_writes": False}  # opening's probe is test_store_s3.py's; here it only costs time


def _run_until_write(location: str, op, k: int, options: dict) -> int:
    """Run `op(store)` in a forked child that dies (os._exit) just before its k-th S3 write; its exit code."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            store = open_store(location, tiny_spec(), **QUICK_OPEN, **options)
            count, original = [0], BaseClient._make_api_call

            def call(self, name, params):
                if name in WRITES:
                    if count[0] == k:
                        os._exit(CRASHED)
                    count[0] += 1
                return original(self, name, params)

            BaseClient._make_api_call = call
            op(store)
            os._exit(0)
        except BaseException:
            os._exit(3)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _full_state(location: str, blobs) -> tuple:
    """(task, active, rollback history, versions) per task; every listed version reads back as uploaded, and
    once unreferenced uploads are collected no object is left that no state lists."""
    store = open_store(location, tiny_spec(), **QUICK_OPEN)
    by_id = {version_id(b): b for bs in blobs.values() for b in bs}
    tasks = store.tasks()
    for t in tasks:
        for v in t.versions:
            assert store.read(t.name, v.version) == by_id[v.version]
    store.collect_garbage(grace_s=0)
    listed = {v["object"] for t in tasks for v in store._state(t.name)["versions"]}
    left = {k for k, _ in store.objects.list("versions/")} | {k for k, _ in store.objects.list("probes/")}
    assert left == listed, left ^ listed
    return tuple((t.name, t.active, tuple(t.history), tuple(v.version for v in t.versions)) for t in tasks)


# One of each kind of commit: an upload plus its entry, an entry alone, an entry then deletes, a task's end; and
# one commit that also writes a checkpoint and prunes the oldest (checkpoint_every=1: the template made two).
SCENARIOS = [
    ("put-new-version", lambda s, b: s.put("sst2", b["sst2"][2]), {}),
    ("put-new-task", lambda s, b: s.put("mnli", b["mnli"][0]), {}),
    ("put-same-content-again", lambda s, b: s.put("sst2", b["sst2"][0]), {}),
    ("activate", lambda s, b: s.activate("sst2", version_id(b["sst2"][0])), {}),
    ("rollback", lambda s, b: s.rollback("sst2"), {}),
    ("force-delete-active-version", lambda s, b: s.delete_version("sst2", version_id(b["sst2"][1]), force=True), {}),
    ("delete-task", lambda s, b: s.delete_task("sst2"), {}),
    ("put-with-a-checkpoint", lambda s, b: s.put("sst2", b["sst2"][2]), {"checkpoint_every": 1}),
]


@pytest.mark.parametrize("op,options", [s[1:] for s in SCENARIOS], ids=[s[0] for s in SCENARIOS])
def test_a_crash_before_every_s3_write_leaves_old_or_new_state(s3_env, op, options):
    layout = tiny_layout()
    blobs = {t: [valid_bytes(layout, task=t, seed=i) for i in range(3)] for t in ("sst2", "cola", "mnli")}

    def template() -> tuple[str, int]:
        location = f"s3://{BUCKET}/{new_prefix('crash')}"
        store = open_store(location, tiny_spec(), **QUICK_OPEN, **options)
        store.put("sst2", blobs["sst2"][0])
        store.put("sst2", blobs["sst2"][1])  # active, with sst2[0] on the rollback history
        store.put("cola", blobs["cola"][0])
        return location, store.generation()

    first, _ = template()
    old = _full_state(first, blobs)
    op(open_store(first, tiny_spec(), **QUICK_OPEN, **options), blobs)
    new = _full_state(first, blobs)
    assert new != old

    outcomes = []
    for k in range(30):
        location, g_old = template()
        code = _run_until_write(location, lambda s: op(s, blobs), k, options)
        assert code in (CRASHED, 0), f"child failed at write {k} with exit code {code}"
        seen = _full_state(location, blobs)
        assert seen in (old, new), f"crash before write {k} left a third state: {seen}"
        if seen == new:
            assert open_store(location, tiny_spec(), **QUICK_OPEN).generation() > g_old
        outcomes.append(seen == new)
        if code == 0:
            break
    assert code == 0 and outcomes[-1] is True and len(outcomes) >= 2
    assert outcomes == sorted(outcomes)  # old until the commit, new from it on
    if options:
        keys = [k for k, _ in open_store(location, tiny_spec(), **QUICK_OPEN).objects.list("checkpoints/")]
        assert keys == ["checkpoints/%020d.json" % g for g in (3, 4)]


def test_sigkill_of_a_looping_writer_on_s3_leaves_old_or_new_state(s3_env, tmp_path):
    layout = tiny_layout()
    blobs = {t: [valid_bytes(layout, task=t, seed=i) for i in range(4)] for t in TASKS}

    def observe() -> State:
        store = open_store(s3_env.location, tiny_spec())
        state = {}
        for t in store.tasks():
            ids = frozenset(v.version for v in t.versions)
            for v in ids:
                assert version_id(store.read(t.name, v)) == v
            assert t.active is None or t.active in ids
            state[t.name] = (ids, t.active)
        return state

    # an S3 op is a few requests (tens of ms), so the kills come later than on a directory: 50-350 ms in
    rounds, acks, midway = sigkill_rounds(s3_env.location, blobs, observe, tmp_path, min_rounds=12, min_acks=30,
                                          time_cap=40.0, window=(0.05, 0.35))
    print(f"{rounds} kills, {acks} acknowledged ops, {midway} kills inside an operation")
    assert rounds >= 10 and acks >= 30, (rounds, acks)
    assert midway >= rounds // 3, f"only {midway} of {rounds} kills landed inside an operation"
    store = open_store(s3_env.location, tiny_spec())
    store.collect_garbage(grace_s=0)  # what the killed writers left: uploads no commit lists
    listed = {v["object"] for t in store.tasks() for v in store._state(t.name)["versions"]}
    assert {k for k, _ in store.objects.list("versions/")} == listed


# ---- two processes, one task ----

Model = tuple[frozenset, "str | None", tuple]  # versions, active, rollback history


def _model(state: Model, op: tuple) -> tuple[Model, str | None]:
    """The documented effect and result of one op on (versions, active, history); None: nothing to roll back."""
    versions, active, history = state
    kind, v, *rest = op
    if kind == "rollback":
        history = [h for h in history if h in versions]
        while history and history[-1] == active:
            history.pop()
        if not history:
            return state, None
        return (versions, history[-1], tuple(history[:-1])), history[-1]
    if kind == "put":
        versions = versions | {v}
    if (kind == "activate" or rest == [True]) and active != v:
        history = (history + ((active,) if active else ()))[-64:]
        active = v
    return (versions, active, history), v


def _reachable_ends(runs: list[list[tuple]], start: Model) -> set[Model]:
    """Every final state of an interleaving of the two runs (each in its own order) in which each op gives
    the result its process saw."""
    (a, b), frontier = runs, {(0, 0): {start}}
    for i in range(len(a) + 1):
        for j in range(len(b) + 1):
            for state in frontier.get((i, j), ()):
                for run, at, nxt in ((a, i, (i + 1, j)), (b, j, (i, j + 1))):
                    if at < len(run):
                        *op, seen = run[at]
                        after, result = _model(state, tuple(op))
                        if result == seen:
                            frontier.setdefault(nxt, set()).add(after)
    return frontier.get((len(a), len(b)), set())


def _write_one_task(location: str, blobs: list[bytes], own: str, own_blobs: list[bytes], barrier, out) -> None:
    store = open_store(location, tiny_spec())
    barrier.wait()
    run, own_acked = [], []
    for i, data in enumerate(blobs):
        v = version_id(data)
        act = i % 3 != 1
        run.append(("put", v, act, store.put("shared", data, activate=act).version))
        own_acked.append(store.put(own, own_blobs[i]).version)  # other tasks' commits interleave too
        if i % 3 == 1:
            run.append(("activate", v, store.activate("shared", v).version))
        if i % 4 == 3:
            try:
                run.append(("rollback", None, store.rollback("shared").version))
            except NothingToRollBack:
                run.append(("rollback", None, None))
    out.put((run, own, own_acked))


def test_two_processes_writing_one_task_through_s3_keep_every_version_in_a_possible_order(s3_env):
    layout = tiny_layout()
    common = valid_bytes(layout, task="shared", seed=99)  # both upload these exact bytes too
    jobs = [([valid_bytes(layout, task="shared", seed=s + i) for i in range(6)] + [common],
             own, [valid_bytes(layout, task=own, seed=s + i) for i in range(7)])
            for own, s in (("alpha", 0), ("beta", 100))]
    open_store(s3_env.location, tiny_spec())
    ctx = mp.get_context("fork")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_write_one_task, args=(s3_env.location, *job, barrier, out)) for job in jobs]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0

    store = open_store(s3_env.location, tiny_spec())
    tasks = {t.name: t for t in store.tasks()}
    assert sorted(tasks) == ["alpha", "beta", "shared"]
    runs = []
    for run, own, own_acked in results:
        runs.append(run)
        for v in [r[-1] for r in run if r[0] == "put"] + own_acked:  # every acknowledged version is there
            data = store.read("shared" if v not in own_acked else own, v)
            assert version_id(data) == v and validate(data, tiny_spec(), max_bytes=2**20) == []
        assert tasks[own].active == own_acked[-1] and len(tasks[own].versions) == 7
    shared = tasks["shared"]
    assert len(shared.versions) == 13  # 6 + 6 distinct, and the common bytes once
    observed = (frozenset(v.version for v in shared.versions), shared.active, tuple(shared.history))
    ends = _reachable_ends(runs, (frozenset(), None, ()))
    assert ends, "no interleaving of the two runs gives the results the processes saw"
    assert observed in ends, f"{observed} is the end of no interleaving of the two runs ({len(ends)} possible ends)"
