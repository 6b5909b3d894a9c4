"""BiasStore behaviour: content-addressed immutable versions, pointer flips, deletes, listing, generation, recovery."""

from __future__ import annotations

import json

import pytest
import torch
from test_store_support import snapshot, tiny_layout, tiny_spec, valid_bytes, with_header

from bias_store import (
    BiasStore,
    StoreError,
    TaskNotFound,
    VersionActive,
    VersionNotFound,
)
from bias_store.store import version_id
from bitfit.bias_set import BiasSet


@pytest.fixture
def store(tmp_path):
    return BiasStore(tmp_path / "store", tiny_spec())


def blob(seed: int, task: str = "sst2", **kw) -> bytes:
    return valid_bytes(tiny_layout(), task=task, seed=seed, **kw)


def test_put_names_the_version_by_content_hash_and_makes_it_active(store):
    data = blob(0)
    info = store.put("sst2", data)
    assert info.version == version_id(data) and len(info.version) == 16
    assert info.version != version_id(blob(1))
    assert info.active and info.size == len(data) and info.labels == ["neg", "pos"] and info.method == "bitfit"
    assert store.read("sst2") == data == store.read("sst2", info.version)
    assert (store.root / "sst2" / "versions" / f"{info.version}.safetensors").read_bytes() == data


def test_same_bytes_twice_is_a_noop_returning_the_same_version(store):
    data = blob(0)
    first = store.put("sst2", data)
    before, generation = snapshot(store.root), store.generation()
    assert store.put("sst2", data) == first
    assert snapshot(store.root) == before and store.generation() == generation


def test_same_bias_set_with_metadata_keys_in_another_order_is_the_same_version(store):
    data = blob(0)
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"] = dict(reversed(header["__metadata__"].items()))
    reordered = with_header(dict(reversed(header.items())), data[8 + n :])
    assert reordered != data
    first = store.put("sst2", data)
    before = snapshot(store.root)
    assert store.put("sst2", reordered) == first
    assert snapshot(store.root) == before and store.read("sst2") == data


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
    a, b, c = (store.put("sst2", blob(i)).version for i in range(3))
    versions_dir = store.root / "sst2" / "versions"
    files = {p.name: p.read_bytes() for p in versions_dir.iterdir()}
    assert store.activate("sst2", a).active
    assert store.task("sst2").active == a
    assert store.rollback("sst2").version == c  # back to what was active before
    assert store.rollback("sst2").version == b
    assert store.rollback("sst2").version == a
    with pytest.raises(StoreError, match="no previously active version to roll back to"):
        store.rollback("sst2")
    assert {p.name: p.read_bytes() for p in versions_dir.iterdir()} == files


def test_activate_unknown_version_is_refused_and_store_unchanged(store):
    a = store.put("sst2", blob(0)).version
    before = snapshot(store.root)
    with pytest.raises(VersionNotFound, match=f"task 'sst2' has no version 'feedface'; its versions are \\['{a}'\\]"):
        store.activate("sst2", "feedface")
    with pytest.raises(TaskNotFound, match="task 'mnli' is not in the store"):
        store.activate("mnli", a)
    assert snapshot(store.root) == before


def test_deleting_the_active_version_is_refused_unless_forced(store):
    a = store.put("sst2", blob(0)).version
    b = store.put("sst2", blob(1)).version
    before = snapshot(store.root)
    with pytest.raises(VersionActive, match=f"version '{b}' is the active version of task 'sst2'"):
        store.delete_version("sst2", b)
    assert snapshot(store.root) == before
    store.delete_version("sst2", b, force=True)
    assert store.task("sst2").active == a  # the previously active version takes over
    assert [v.version for v in store.task("sst2").versions] == [a]
    assert not (store.root / "sst2" / "versions" / f"{b}.safetensors").exists()
    with pytest.raises(VersionNotFound):
        store.read("sst2", b)


def test_deleting_an_inactive_version_keeps_the_active_one(store):
    a = store.put("sst2", blob(0)).version
    b = store.put("sst2", blob(1)).version
    store.delete_version("sst2", a)
    assert store.task("sst2").active == b
    with pytest.raises(StoreError, match="no previously active"):
        store.rollback("sst2")  # the deleted version left the history too


def test_deleting_the_last_version_or_the_task_removes_it_whole(store):
    a = store.put("sst2", blob(0)).version
    store.put("cola", blob(1, task="cola"))
    store.delete_version("sst2", a, force=True)
    assert not (store.root / "sst2").exists()
    store.delete_task("cola")
    assert not (store.root / "cola").exists() and store.tasks() == []
    with pytest.raises(TaskNotFound):
        store.delete_task("cola")
    assert sorted(p.name for p in store.root.iterdir()) == [".lock", "GENERATION"]


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
    store.tasks(), store.read("sst2"), store.active_versions()
    with pytest.raises(VersionNotFound):
        store.activate("sst2", "0" * 16)
    assert store.generation() == g


def test_a_second_store_on_the_same_directory_sees_changes(tmp_path):
    writer, reader = BiasStore(tmp_path, tiny_spec()), BiasStore(tmp_path, tiny_spec())
    g = reader.generation()
    v = writer.put("sst2", blob(0)).version
    assert reader.generation() > g and reader.active_versions() == {"sst2": v}


def test_load_gives_back_the_uploaded_bias_set(store):
    data = blob(0)
    store.put("sst2", data)
    info, bias_set = store.load("sst2")
    expected = BiasSet.from_bytes(data)
    torch.testing.assert_close(bias_set.delta, expected.delta)
    torch.testing.assert_close(bias_set.head["out.weight"], expected.head["out.weight"])
    assert info.active and bias_set.labels == ["neg", "pos"] and bias_set.task == "sst2"


def test_a_damaged_version_file_is_detected_on_read(store):
    v = store.put("sst2", blob(0)).version
    path = store.root / "sst2" / "versions" / f"{v}.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="damaged on disk"):
        store.read("sst2")


def test_leftovers_of_interrupted_writes_are_removed_on_open_and_never_listed(tmp_path):
    store = BiasStore(tmp_path, tiny_spec())
    v = store.put("sst2", blob(0)).version
    before = snapshot(tmp_path)
    orphan = blob(1)  # renamed into versions/ but its STATE never committed
    (tmp_path / "sst2" / "versions" / "0123456789abcdef.safetensors").write_bytes(orphan)
    (tmp_path / "sst2" / "versions" / ".tmp-abc.safetensors.x1").write_bytes(orphan[:100])
    (tmp_path / "sst2" / ".tmp-STATE.json.x2").write_text('{"half": ')
    (tmp_path / "cola" / "versions").mkdir(parents=True)  # a first upload that died before its commit
    (tmp_path / "cola" / "versions" / "fedcba9876543210.safetensors").write_bytes(orphan)
    (tmp_path / ".trash-mnli-1234").mkdir()
    (tmp_path / ".trash-mnli-1234" / "STATE.json").write_text("{}")
    (tmp_path / ".tmp-GENERATION.x3").write_text("99")
    assert [t.name for t in store.tasks()] == ["sst2"]  # a live reader already ignores them
    assert [x.version for x in store.task("sst2").versions] == [v]
    g = store.generation()
    reopened = BiasStore(tmp_path, tiny_spec())
    after = snapshot(tmp_path)
    assert after.pop("GENERATION") != before.pop("GENERATION")
    assert after == before
    assert reopened.generation() > g


def test_a_commit_without_its_generation_bump_is_repaired_by_the_next_reader(store):
    store.put("sst2", blob(0))
    g = store.generation()
    (store.root / ".dirty").touch()  # as if a writer died between its STATE rename and the bump
    assert store.generation() == g + 1
    assert not (store.root / ".dirty").exists()
    assert store.generation() == g + 1


def test_state_file_is_plain_json_documenting_the_task(store):
    a = store.put("sst2", blob(0)).version
    b = store.put("sst2", blob(1)).version
    state = json.loads((store.root / "sst2" / "STATE.json").read_text())
    assert state["active"] == b and state["history"] == [a]
    assert [v["version"] for v in state["versions"]] == [a, b]


def test_threads_sharing_one_store_serialise_their_writes(store):
    from concurrent.futures import ThreadPoolExecutor

    datas = [blob(i) for i in range(12)]
    with ThreadPoolExecutor(4) as pool:
        versions = list(pool.map(lambda d: store.put("sst2", d).version, datas))
    info = store.task("sst2")
    assert sorted(v.version for v in info.versions) == sorted(versions) and info.active in versions
    state = json.loads((store.root / "sst2" / "STATE.json").read_text())
    assert len(state["history"]) == 11 and info.active not in state["history"]
