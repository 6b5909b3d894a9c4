"""The directory backend's own promises: its files, recovery of leftovers on open, the generation file's change
feed, and the audit log as JSON lines (the contract both backends keep is test_store.py)."""

from __future__ import annotations

import json

import pytest
from test_store_support import snapshot, tiny_layout, tiny_spec, valid_bytes

from bias_store import BiasStore, StoreDamaged, open_store
from bias_store.backends import local


@pytest.fixture
def store(tmp_path):
    return BiasStore(tmp_path / "store", tiny_spec())


def blob(seed: int, task: str = "sst2", **kw) -> bytes:
    return valid_bytes(tiny_layout(), task=task, seed=seed, **kw)


def test_a_version_is_one_file_named_by_its_id(store):
    data = blob(0)
    info = store.put("sst2", data)
    assert (store.root / "sst2" / "versions" / f"{info.version}.safetensors").read_bytes() == data
    assert isinstance(open_store(store.root, tiny_spec()), BiasStore)


def test_deleting_the_last_version_or_the_task_removes_its_directory(store):
    a = store.put("sst2", blob(0)).version
    store.put("cola", blob(1, task="cola"))
    store.delete_version("sst2", a, force=True)
    assert not (store.root / "sst2").exists()
    store.delete_task("cola")
    assert not (store.root / "cola").exists()
    assert sorted(p.name for p in store.root.iterdir()) == [".lock", "GENERATION"]


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
    (store.root / ".dirty").write_text("sst2")  # as if a writer died between its STATE rename and the bump
    assert store.generation() == g + 1
    assert not (store.root / ".dirty").exists()
    assert store.generation() == g + 1
    assert store.changes_since(g) == (g + 1, ["sst2"])  # the marker named the task
    (store.root / ".dirty").write_text("")  # a marker from an older version names nothing: rescan all
    assert store.changes_since(g + 1) == (g + 2, None)


def test_state_file_is_plain_json_documenting_the_task(store):
    a = store.put("sst2", blob(0)).version
    b = store.put("sst2", blob(1)).version
    state = json.loads((store.root / "sst2" / "STATE.json").read_text())
    assert state["active"] == b and state["history"] == [a]
    assert [v["version"] for v in state["versions"]] == [a, b]


def test_generation_file_holds_the_generation_then_the_last_changes(store, monkeypatch):
    store.put("sst2", blob(0))
    store.put("cola", blob(1, task="cola"))
    assert (store.root / "GENERATION").read_text().split("\n") == ["2", "1 sst2", "2 cola"]
    monkeypatch.setattr(local, "FEED_LENGTH", 4)  # 256 in use; a short feed makes the test quick
    for i in range(3):
        store.put("sst2", blob(2 + i))
    g = store.generation()
    assert (store.root / "GENERATION").read_text().split("\n") == ["5", "2 cola", "3 sst2", "4 sst2", "5 sst2"]
    assert store.changes_since(g - 4) == (g, ["cola", "sst2"])
    assert store.changes_since(g - 5) == (g, None)  # older than the feed: rescan everything


def test_a_generation_file_of_an_older_store_reads_as_its_generation(store):
    store.put("sst2", blob(0))
    (store.root / "GENERATION").write_text("41")
    assert store.generation() == 41 and store.changes_since(40) == (41, None)
    store.put("cola", blob(1, task="cola"))
    assert store.changes_since(41) == (42, ["cola"])
    (store.root / "GENERATION").write_text("forty-two")
    with pytest.raises(StoreDamaged, match="GENERATION is damaged"):
        store.generation()


def test_audit_log_is_json_lines_and_a_torn_last_line_is_ended_before_the_next(store):
    first = store.append_audit({"action": "put", "task": "sst2"})
    path = store.root / "AUDIT.jsonl"
    assert [json.loads(line) for line in path.read_text().splitlines()] == [first]
    with open(path, "a") as f:
        f.write('{"action": "activ')  # a power cut in the middle of an append
    second = store.append_audit({"action": "rollback", "task": "sst2"})
    assert store.audit() == [second, first]
    assert path.read_text().splitlines()[-1] == json.dumps(second, separators=(",", ":"), sort_keys=True)


def test_a_damaged_state_file_is_a_damaged_store(store):
    store.put("sst2", blob(0))
    (store.root / "sst2" / "STATE.json").write_text('{"task": ')
    with pytest.raises(StoreDamaged, match="STATE.json is damaged"):
        store.task("sst2")
