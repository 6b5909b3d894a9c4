"""The store's contract, on both backends (a directory, and S3 on a real SeaweedFS): content-addressed immutable
versions, pointer flips, deletes, listing, generation and change feed, audit log, refusals that change nothing.

Backend-specific behaviour (files on disk, the S3 log) is in test_store_local.py and test_store_s3.py.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from test_store_support import backend_for, parts, raw, tiny_layout, valid_bytes, with_header

from bias_store import (
    InvalidBiasSet,
    InvalidTaskName,
    NothingToRollBack,
    PayloadTooLarge,
    StoreDamaged,
    StoreError,
    TaskNotFound,
    VersionActive,
    VersionNotFound,
)
from bias_store.store import version_id
from bitfit.bias_set import BiasSet


@pytest.fixture(params=["dir", "s3"])
def backend(request, tmp_path):
    return backend_for(request, tmp_path)


@pytest.fixture
def store(backend):
    return backend.open()


def blob(seed: int, task: str = "sst2", **kw) -> bytes:
    return valid_bytes(tiny_layout(), task=task, seed=seed, **kw)


def test_put_names_the_version_by_content_hash_and_makes_it_active(store):
    data = blob(0)
    info = store.put("sst2", data)
    assert info.version == version_id(data) and len(info.version) == 16
    assert info.version != version_id(blob(1))
    assert info.active and info.size == len(data) and info.labels == ["neg", "pos"] and info.method == "bitfit"
    assert info.kind == "classification"
    assert store.read("sst2") == data == store.read("sst2", info.version)


def test_same_bytes_twice_is_a_noop_returning_the_same_version(backend, store):
    data = blob(0)
    first = store.put("sst2", data)
    before, generation = backend.snapshot(), store.generation()
    assert store.put("sst2", data) == first
    assert backend.snapshot() == before and store.generation() == generation


def test_same_bias_set_with_metadata_keys_in_another_order_is_the_same_version(backend, store):
    data = blob(0)
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"] = dict(reversed(header["__metadata__"].items()))
    reordered = with_header(dict(reversed(header.items())), data[8 + n :])
    assert reordered != data
    first = store.put("sst2", data)
    before = backend.snapshot()
    assert store.put("sst2", reordered) == first
    assert backend.snapshot() == before and store.read("sst2") == data


def test_same_bytes_again_reactivate_an_older_version(store):
    a = store.put("sst2", blob(0))
    store.put("sst2", blob(1))
    assert store.put("sst2", blob(0)).active
    assert store.task("sst2").active == a.version and len(store.task("sst2").versions) == 2


def test_put_without_activate_keeps_the_active_version(store):
    a = store.put("sst2", blob(0))
    b = store.put("sst2", blob(1), activate=False)
    assert not b.active and store.task("sst2").active == a.version
    fresh = store.put("cola", blob(2, task="cola"), activate=False)
    assert store.task("cola").active is None and not fresh.active
    assert "cola" not in store.active_versions()
    with pytest.raises(VersionNotFound, match="task 'cola' has no active version; activate one"):
        store.read("cola")


def test_activate_and_rollback_flip_the_pointer_and_leave_versions_untouched(store):
    datas = [blob(i) for i in range(3)]
    a, b, c = (store.put("sst2", d).version for d in datas)
    assert store.activate("sst2", a).active
    assert store.task("sst2").active == a and store.task("sst2").history == [a, b, c]
    assert store.rollback("sst2").version == c  # back to what was active before
    assert store.rollback("sst2").version == b
    assert store.rollback("sst2").version == a
    assert [store.read("sst2", v) for v in (a, b, c)] == datas


def test_rollback_with_nothing_left_to_roll_back_to_is_its_own_error(store):
    store.put("sst2", blob(0))
    with pytest.raises(NothingToRollBack, match="task 'sst2' has no previously active version to roll back to"):
        store.rollback("sst2")
    assert issubclass(NothingToRollBack, StoreError)


def test_activate_unknown_version_is_refused_and_store_unchanged(backend, store):
    a = store.put("sst2", blob(0)).version
    before, g = backend.snapshot(), store.generation()
    with pytest.raises(VersionNotFound, match=f"task 'sst2' has no version 'feedface'; its versions are \\['{a}'\\]"):
        store.activate("sst2", "feedface")
    with pytest.raises(TaskNotFound, match="task 'mnli' is not in the store"):
        store.activate("mnli", a)
    assert backend.snapshot() == before and store.generation() == g


def test_store_messages_speak_of_the_store_not_of_http(store):
    with pytest.raises(TaskNotFound) as e:
        store.task("mnli")
    assert str(e.value) == "task 'mnli' is not in the store; store a bias set for it first"
    assert not any(word in str(e.value) for word in ("PUT", "GET", "/tasks", "HTTP"))


def test_deleting_the_active_version_is_refused_unless_forced(backend, store):
    a = store.put("sst2", blob(0)).version
    b = store.put("sst2", blob(1)).version
    before = backend.snapshot()
    with pytest.raises(VersionActive, match=f"version '{b}' is the active version of task 'sst2'"):
        store.delete_version("sst2", b)
    assert backend.snapshot() == before
    store.delete_version("sst2", b, force=True)
    assert store.task("sst2").active == a  # the previously active version takes over
    assert [v.version for v in store.task("sst2").versions] == [a]
    with pytest.raises(VersionNotFound):
        store.read("sst2", b)


def test_deleting_an_inactive_version_keeps_the_active_one(store):
    a = store.put("sst2", blob(0)).version
    b = store.put("sst2", blob(1)).version
    store.delete_version("sst2", a)
    assert store.task("sst2").active == b
    with pytest.raises(NothingToRollBack):
        store.rollback("sst2")  # the deleted version left the history too


def test_deleting_the_last_version_or_the_task_removes_it_whole(store):
    a = store.put("sst2", blob(0)).version
    store.put("cola", blob(1, task="cola"))
    store.delete_version("sst2", a, force=True)
    assert [t.name for t in store.tasks()] == ["cola"]
    store.delete_task("cola")
    assert store.tasks() == [] and store.active_versions() == {}
    with pytest.raises(TaskNotFound):
        store.delete_task("cola")
    again = store.put("cola", blob(1, task="cola"))  # a deleted task can come back, with no trace of the old
    assert store.task("cola").versions == [again] and store.task("cola").history == []


def test_listing_shows_tasks_sorted_with_versions_oldest_first(store):
    store.put("sst2", blob(0, metrics={"accuracy": 0.91}))
    second = store.put("sst2", blob(1), activate=False)
    store.put("stsb", blob(2, task="stsb", labels=()))
    store.put("cola", blob(3, task="cola", labels=("unacceptable", "acceptable")))
    tasks = store.tasks()
    assert [t.name for t in tasks] == ["cola", "sst2", "stsb"]
    sst2 = tasks[1]
    assert [v.metrics for v in sst2.versions] == [{"accuracy": 0.91}, {"accuracy": 0.501}]
    assert [v.active for v in sst2.versions] == [True, False] and sst2.versions[1] == second
    assert sst2.versions[0].created_at <= sst2.versions[1].created_at
    assert tasks[2].versions[0].labels == []  # regression
    assert tasks[0].versions[0].labels == ["unacceptable", "acceptable"]
    assert store.active_versions() == {t.name: t.active for t in tasks}


def test_generation_moves_on_every_mutation_and_not_on_reads_or_failures(store):
    seen = [store.generation()]

    def step(fn, *args, **kw):
        fn(*args, **kw)
        seen.append(store.generation())

    a = store.put("sst2", blob(0)).version
    seen.append(store.generation())
    step(store.put, "sst2", blob(1))
    step(store.activate, "sst2", a)
    step(store.rollback, "sst2")
    step(store.delete_version, "sst2", a)
    step(store.put, "cola", blob(2, task="cola"))
    step(store.delete_task, "cola")
    assert seen == sorted(set(seen)), seen
    g = store.generation()
    store.tasks(), store.read("sst2"), store.active_versions(), store.changes_since(0)
    with pytest.raises(VersionNotFound):
        store.activate("sst2", "0" * 16)
    assert store.generation() == g


def test_changes_since_names_the_tasks_changed_after_a_generation(store):
    g0 = store.generation()
    assert store.changes_since(g0) == (g0, [])
    store.put("sst2", blob(0))
    g1 = store.generation()
    store.put("cola", blob(1, task="cola"))
    store.put("sst2", blob(2))
    g3 = store.generation()
    assert store.changes_since(g1) == (g3, ["cola", "sst2"])
    assert store.changes_since(g0) == (g3, ["cola", "sst2"])
    assert store.changes_since(g3) == (g3, [])
    assert store.changes_since(g3 + 5) == (g3, None)  # not a generation of this store: rescan everything
    store.delete_task("cola")
    assert store.changes_since(g3) == (store.generation(), ["cola"])


def test_a_second_store_on_the_same_location_sees_changes(backend):
    writer, reader = backend.open(), backend.open()
    g = reader.generation()
    v = writer.put("sst2", blob(0)).version
    assert reader.generation() > g and reader.active_versions() == {"sst2": v}
    assert reader.changes_since(g) == (reader.generation(), ["sst2"])
    writer.put("sst2", blob(1))
    assert reader.rollback("sst2").version == v and writer.task("sst2").active == v


def test_load_gives_back_the_uploaded_bias_set(store):
    data = blob(0)
    store.put("sst2", data)
    info, bias_set = store.load("sst2")
    expected = BiasSet.from_bytes(data)
    torch.testing.assert_close(bias_set.delta, expected.delta)
    torch.testing.assert_close(bias_set.head["out.weight"], expected.head["out.weight"])
    assert info.active and bias_set.labels == ["neg", "pos"] and bias_set.task == "sst2"


def test_a_damaged_version_is_detected_on_read_as_a_damaged_store(backend, store):
    v = store.put("sst2", blob(0)).version
    backend.damage(store, "sst2", v)
    with pytest.raises(StoreDamaged, match="damaged .*content hash mismatch"):
        store.read("sst2")
    assert not issubclass(StoreDamaged, (TaskNotFound, VersionNotFound))


def _wrong_backbone(layout):
    tensors, meta = parts(layout)
    meta["backbone_fingerprint"] = "0" * 64
    return raw(tensors, meta)


REFUSED = [  # a few of test_validate.py's cases, on every backend
    ("pickle", lambda layout: b"\x80\x04\x95" + bytes(64), InvalidBiasSet, "Python pickle"),
    ("other-backbone", _wrong_backbone, InvalidBiasSet, "trained on backbone"),
    ("task-mismatch", lambda layout: valid_bytes(layout, task="cola"), InvalidBiasSet, "names task 'cola'"),
    ("oversize", lambda layout: bytes(300_000), PayloadTooLarge, "over the store's limit"),
]


@pytest.mark.parametrize("make,error,message", [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_a_refused_upload_writes_nothing(backend, make, error, message):
    store = backend.open(max_bytes=256 * 1024)
    store.put("sst2", blob(0))
    before, g = backend.snapshot(), store.generation()
    with pytest.raises(error, match=message):
        store.put("sst2", make(tiny_layout()))
    with pytest.raises(InvalidTaskName, match="path separator"):
        store.put("../sst2", blob(0))
    assert backend.snapshot() == before and store.generation() == g


def test_threads_sharing_one_store_serialise_their_writes(store):
    datas = [blob(i) for i in range(12)]
    with ThreadPoolExecutor(4) as pool:
        versions = list(pool.map(lambda d: store.put("sst2", d).version, datas))
    info = store.task("sst2")
    assert sorted(v.version for v in info.versions) == sorted(versions) and info.active in versions
    assert len(info.history) == 11 and info.active not in info.history


def test_audit_log_keeps_records_newest_first_across_a_reopen(backend, store):
    records = [{"token": "ci", "action": a, "task": t, "version": v, "client": "10.0.0.7"}
               for a, t, v in [("put", "sst2", "aa"), ("activate", "cola", "bb"), ("rollback", "sst2", "cc")]]
    stored = [store.append_audit(r) for r in records]
    assert all(s == {"time": s["time"]} | r for s, r in zip(stored, records))
    reopened = backend.open()
    assert reopened.audit() == stored[::-1]
    assert reopened.audit(task="sst2") == [stored[2], stored[0]]
    assert reopened.audit(limit=1) == [stored[2]] and reopened.audit(task="mnli") == []
    assert reopened.append_audit({"action": "delete", "time": "2030-01-01T00:00:00+00:00"})["time"].startswith("2030")
    with pytest.raises(TypeError):
        store.append_audit(["not", "a", "dict"])
