"""The S3 backend on a real SeaweedFS: what the server guarantees that the commits rely on, opening (locations,
endpoint, credentials, missing bucket), the sealed append-only log and its checkpoints, the cost of a poll,
lost races, a lost answer, the server going away and coming back, and garbage collection.

Faults are added by a proxy or a wrapped client in front of the real server (s3_server.py), never instead of it.
"""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import pytest
from s3_server import BUCKET, READER_KEY, READER_SECRET, FaultyProxy, objects_under
from test_store_support import tiny_layout, tiny_spec, valid_bytes

from bias_store import (
    BiasStore,
    StoreConflict,
    StoreDamaged,
    StoreMisconfigured,
    StoreUnavailable,
    open_store,
    parse_location,
)
from bias_store.backends.s3 import S3Store, log_key, unseal
from bias_store.backends.s3_objects import Timeouts
from bias_store.store import version_id

QUICK = Timeouts(connect_s=0.5, read_s=2.0, attempts=1)  # for calls meant to fail: fail at once


def blob(seed: int, task: str = "sst2") -> bytes:
    return valid_bytes(tiny_layout(), task=task, seed=seed)


class Calls:
    """Counts the S3 requests a client makes (by operation name)."""

    def __init__(self, store: S3Store):
        self.names: list[str] = []
        store.objects.client.meta.events.register("before-call.s3.*", lambda model, **kw: self.names.append(model.name))

    def take(self) -> list[str]:
        out, self.names = self.names, []
        return out


# ---- what the server does, which the store's commits rely on ----


def test_seaweedfs_lets_exactly_one_of_racing_put_if_absent_writers_win(s3_env):
    client, key = s3_env.client(), f"{s3_env.prefix}/race"
    results, barrier = [], threading.Barrier(8)

    def writer(i):
        c = s3_env.client()
        barrier.wait()
        try:
            c.put_object(Bucket=BUCKET, Key=key, Body=str(i).encode(), IfNoneMatch="*")
            results.append(i)
        except c.exceptions.ClientError as e:
            results.append(e.response["Error"]["Code"])

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results if isinstance(r, int)]
    assert len(winners) == 1 and results.count("PreconditionFailed") == 7
    assert client.get_object(Bucket=BUCKET, Key=key)["Body"].read() == str(winners[0]).encode()
    etag = client.head_object(Bucket=BUCKET, Key=key)["ETag"]
    client.put_object(Bucket=BUCKET, Key=key, Body=b"next", IfMatch=etag)
    with pytest.raises(client.exceptions.ClientError, match="PreconditionFailed"):
        client.put_object(Bucket=BUCKET, Key=key, Body=b"stale", IfMatch=etag)  # If-Match too: a stale ETag loses


# ---- opening ----

LOCATIONS = [
    ("plain-directory", "bias_sets", ("dir", "bias_sets", "")),
    ("file-name-with-a-colon", "backup:2026", ("dir", "backup:2026", "")),
    ("file-url", "file:///srv/bias", ("dir", "/srv/bias", "")),
    ("s3-with-prefix", "s3://team-bucket/bitfit/prod/", ("s3", "team-bucket", "bitfit/prod")),
    ("s3-bucket-only", "S3://team-bucket", ("s3", "team-bucket", "")),
]


@pytest.mark.parametrize("location,parsed", [c[1:] for c in LOCATIONS], ids=[c[0] for c in LOCATIONS])
def test_a_location_is_a_directory_or_an_s3_bucket_and_prefix(location, parsed):
    assert parse_location(location) == parsed


REFUSED_LOCATIONS = [
    ("http", "http://minio:9000/bucket", "scheme 'http', which the store does not support"),
    ("gs", "gs://bucket/prefix", "scheme 'gs'"),
    ("s3-without-slashes", "s3:bucket/prefix", "looks like a URL without '//'"),
    ("short-bucket", "s3://x", "'x' is not an S3 bucket name"),
    ("upper-case-bucket", "s3://Team_Bucket/p", "is not an S3 bucket name"),
    ("relative-file-url", "file://srv/bias", "takes an absolute path"),
    ("s3-url-through-a-path", Path("s3://team-bucket/p"), "looks like a URL without '//'"),  # Path ate a slash
    ("empty", " ", "is empty"),
]


@pytest.mark.parametrize("location,message", [c[1:] for c in REFUSED_LOCATIONS], ids=[c[0] for c in REFUSED_LOCATIONS])
def test_other_locations_are_refused_naming_the_supported_ones(tmp_path, monkeypatch, location, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StoreMisconfigured, match=re.escape(message)) as e:
        open_store(location, tiny_spec())
    if "scheme" in message or "URL without" in message:
        assert "a directory path, file:///PATH, or s3://BUCKET/PREFIX" in str(e.value)
    assert list(tmp_path.iterdir()) == []  # nothing was made on the way, no directory named "s3:" least of all


def test_open_store_reads_endpoint_and_credentials_from_the_standard_variables(s3_env, tmp_path):
    store = open_store(s3_env.location, tiny_spec())
    assert isinstance(store, S3Store) and store.endpoint == s3_env.endpoint
    assert store.location == s3_env.location and store.bucket == BUCKET and store.prefix == s3_env.prefix
    assert isinstance(open_store(tmp_path / "d", tiny_spec()), BiasStore)


def test_opening_a_missing_bucket_names_endpoint_and_bucket(s3_env):
    with pytest.raises(StoreMisconfigured) as e:
        open_store("s3://no-such-bucket/p", tiny_spec())
    assert "bucket 'no-such-bucket' does not exist" in str(e.value) and s3_env.endpoint in str(e.value)


def test_opening_an_unreachable_endpoint_names_endpoint_and_bucket(s3_env, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard port: nothing listens
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as e:
        open_store(s3_env.location, tiny_spec())  # the default timeouts and retries
    assert time.monotonic() - started < 15
    assert "http://127.0.0.1:9" in str(e.value) and f"s3://{BUCKET}/{s3_env.prefix}" in str(e.value)
    assert "did not answer" in str(e.value)


def test_opening_with_credentials_the_server_refuses_names_endpoint_and_bucket(s3_env, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(StoreMisconfigured) as e:
        open_store(s3_env.location, tiny_spec())
    assert s3_env.endpoint in str(e.value) and repr(BUCKET) in str(e.value) and "AWS_SECRET_ACCESS_KEY" in str(e.value)


def test_read_only_credentials_can_serve_but_a_write_is_refused_as_unavailable(s3_env, monkeypatch):
    writer = open_store(s3_env.location, tiny_spec())
    v = writer.put("sst2", blob(0)).version
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", READER_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", READER_SECRET)
    reader = open_store(s3_env.location, tiny_spec(), timeouts=QUICK)
    assert reader.active_versions() == {"sst2": v} and version_id(reader.read("sst2")) == v
    with pytest.raises(StoreUnavailable, match="refused the credentials"):
        reader.put("sst2", blob(1))
    assert writer.task("sst2").versions == reader.task("sst2").versions


class IgnoresIfNoneMatch:
    """A client for a server that would ignore If-None-Match (as some S3 implementations do)."""

    def __init__(self, client):
        self.client = client

    def __getattr__(self, name):
        return getattr(self.client, name)

    def put_object(self, **kw):
        kw.pop("IfNoneMatch", None)
        return self.client.put_object(**kw)


def test_a_server_that_ignores_put_if_absent_is_refused_at_open(s3_env):
    with pytest.raises(StoreMisconfigured, match="does not honour If-None-Match"):
        S3Store(BUCKET, s3_env.prefix, tiny_spec(), client=IgnoresIfNoneMatch(s3_env.client()))


# ---- the log ----


def test_each_change_is_one_sealed_entry_of_an_append_only_log(s3_env):
    store = open_store(s3_env.location, tiny_spec())
    a = store.put("sst2", blob(0)).version
    store.put("cola", blob(1, "cola"))
    store.activate("sst2", store.put("sst2", blob(2)).version)
    store.rollback("sst2")
    store.delete_task("cola")
    objects = objects_under(s3_env.client(), BUCKET, s3_env.prefix)
    log = [k for k in sorted(objects) if k.startswith("log/")]
    assert log == [log_key(g) for g in range(1, 6)] and store.generation() == 5
    bodies = [unseal(objects[k], k) for k in log]
    assert [(b["g"], b["task"]) for b in bodies] == [(1, "sst2"), (2, "cola"), (3, "sst2"), (4, "sst2"), (5, "cola")]
    assert bodies[-1]["state"] is None and bodies[3]["state"]["active"] == a
    listed = {v["object"] for v in bodies[3]["state"]["versions"]}
    assert {k for k in objects if k.startswith("versions/")} == listed  # cola's went with its task


def test_a_damaged_log_entry_is_a_damaged_store(s3_env):
    open_store(s3_env.location, tiny_spec()).put("sst2", blob(0))
    client, key = s3_env.client(), f"{s3_env.prefix}/{log_key(1)}"
    sealed = json.loads(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    sealed["body"]["state"]["active"] = "0123456789abcdef"
    client.put_object(Bucket=BUCKET, Key=key, Body=json.dumps(sealed).encode())
    with pytest.raises(StoreDamaged, match="content hash mismatch"):
        open_store(s3_env.location, tiny_spec())


def test_a_new_store_replays_from_the_newest_checkpoint_and_skips_a_damaged_one(s3_env):
    writer = open_store(s3_env.location, tiny_spec(), checkpoint_every=3)
    for i in range(10):
        writer.put("sst2" if i % 2 else "cola", blob(i, "sst2" if i % 2 else "cola"))
    keys = sorted(objects_under(s3_env.client(), BUCKET, s3_env.prefix))
    assert [k for k in keys if k.startswith("checkpoints/")] == ["checkpoints/%020d.json" % g for g in (6, 9)]
    reader = open_store(s3_env.location, tiny_spec(), check_conditional_writes=False, gc_grace_s=None)
    assert reader.tasks() == writer.tasks() and reader.generation() == 10
    calls = Calls(writer)
    S3Store(BUCKET, s3_env.prefix, tiny_spec(), client=writer.objects.client, check_conditional_writes=False,
            gc_grace_s=None)
    assert calls.take() == ["HeadBucket", "ListObjectsV2", "GetObject", "ListObjectsV2", "GetObject"]  # one entry
    s3_env.client().put_object(Bucket=BUCKET, Key=f"{s3_env.prefix}/checkpoints/%020d.json" % 9, Body=b"{}")
    assert open_store(s3_env.location, tiny_spec()).tasks() == writer.tasks()  # from checkpoint 6 and the log


def test_a_poll_is_one_request_whatever_the_number_of_tasks(s3_env):
    store = open_store(s3_env.location, tiny_spec())
    for i in range(12):
        store.put(f"t{i}", blob(i, f"t{i}"))
    other = open_store(s3_env.location, tiny_spec())
    g, calls = other.generation(), Calls(other)
    assert other.generation() == g and other.changes_since(g) == (g, [])
    assert calls.take() == ["ListObjectsV2", "ListObjectsV2"]
    store.put("t3", blob(50, "t3"))
    assert other.changes_since(g) == (g + 1, ["t3"])
    assert calls.take() == ["ListObjectsV2", "GetObject"]  # the new entry only


# ---- races, lost answers, outages ----


class CommitsFirst:
    """A client that lets another store commit a change just before each of this store's log writes."""

    def __init__(self, client, before_commit):
        self.client, self.before_commit, self.fired = client, before_commit, 0

    def __getattr__(self, name):
        return getattr(self.client, name)

    def put_object(self, **kw):
        if "/log/" in kw["Key"] and self.before_commit:
            self.fired += 1
            self.before_commit.pop(0)()
        return self.client.put_object(**kw)


def test_a_lost_race_is_run_again_on_the_state_it_lost_to(s3_env):
    a = open_store(s3_env.location, tiny_spec())
    v0 = a.put("sst2", blob(0)).version
    v1 = a.put("sst2", blob(1)).version
    racing = CommitsFirst(s3_env.client(), [lambda: a.put("sst2", blob(2)), lambda: a.put("cola", blob(3, "cola"))])
    b = S3Store(BUCKET, s3_env.prefix, tiny_spec(), client=racing, check_conditional_writes=False)
    assert b.rollback("sst2").version == v1  # not v0: it lost to the upload of a third version and ran again
    assert racing.fired == 2
    task = a.task("sst2")
    assert task.active == v1 and task.history == [v0] and len(task.versions) == 3 and "cola" in a.active_versions()


def test_a_writer_that_keeps_losing_gives_up_with_a_conflict_and_leaves_nothing(s3_env):
    a = open_store(s3_env.location, tiny_spec())
    a.put("sst2", blob(0))
    racing = CommitsFirst(s3_env.client(), [lambda: a.put("cola", blob(2, "cola"))])
    b = S3Store(BUCKET, s3_env.prefix, tiny_spec(), client=racing, check_conditional_writes=False, max_attempts=1)
    g = a.generation()
    with pytest.raises(StoreConflict, match="nothing of this change was committed, try again"):
        b.put("sst2", blob(1))
    assert a.generation() == g + 1 and len(a.task("sst2").versions) == 1
    versions = [k for k in objects_under(s3_env.client(), BUCKET, s3_env.prefix) if k.startswith("versions/sst2/")]
    assert len(versions) == 1  # the loser's upload was removed again


def test_a_lost_answer_to_a_commit_is_recognised_as_its_own_commit(s3_env, seaweedfs):
    proxy = FaultyProxy(seaweedfs.s3_port)
    try:
        store = S3Store(BUCKET, s3_env.prefix, tiny_spec(), endpoint_url=proxy.endpoint)
        store.put("sst2", blob(0))
        proxy.lose_answer_to = re.compile(rf"^PUT /{BUCKET}/{s3_env.prefix}/log/")
        info = store.put("sst2", blob(1))  # boto3 retries the PUT; the server refuses it: the entry exists
        assert proxy.lost == 1
    finally:
        proxy.close()
    fresh = open_store(s3_env.location, tiny_spec())
    assert fresh.generation() == 2 and fresh.task("sst2").active == info.version


def test_s3_down_raises_store_unavailable_and_every_call_recovers_and_catches_up_without_reopening(s3_env, seaweedfs):
    proxy = FaultyProxy(seaweedfs.s3_port)
    try:
        store = S3Store(BUCKET, s3_env.prefix, tiny_spec(), endpoint_url=proxy.endpoint)
        v = store.put("sst2", blob(0)).version
        proxy.down = True
        calls = [store.generation, lambda: store.changes_since(0), store.tasks, lambda: store.task("sst2"),
                 lambda: store.read("sst2"), lambda: store.put("sst2", blob(1)), lambda: store.rollback("sst2"),
                 lambda: store.append_audit({"action": "put"}), store.audit]
        started = time.monotonic()
        for call in calls:
            with pytest.raises(StoreUnavailable) as e:
                call()
            assert proxy.endpoint in str(e.value) and f"s3://{BUCKET}/{s3_env.prefix}" in str(e.value)
        assert time.monotonic() - started < 60  # default timeouts: a few seconds a call at most
        open_store(s3_env.location, tiny_spec()).put("cola", blob(2, "cola"))  # another replica, meanwhile
        proxy.down = False
        assert store.changes_since(1) == (2, ["cola"])  # caught up on its next call
        assert version_id(store.read("sst2")) == v and store.task("sst2").active == v
        assert store.put("sst2", blob(1)).active and store.generation() == 3
    finally:
        proxy.close()


# ---- garbage ----


def test_garbage_collection_removes_unreferenced_uploads_only_after_the_grace(s3_env):
    store = open_store(s3_env.location, tiny_spec())
    v = store.put("sst2", blob(0)).version
    client = s3_env.client()
    orphan = f"versions/sst2/{version_id(blob(1))}-deadbeef0000.safetensors"  # a writer died before its commit
    client.put_object(Bucket=BUCKET, Key=f"{s3_env.prefix}/{orphan}", Body=blob(1))
    assert store.collect_garbage(grace_s=3600) == []  # could be a writer about to commit
    assert open_store(s3_env.location, tiny_spec()).task("sst2").active == v  # opening keeps it too (1 h grace)
    assert store.collect_garbage(grace_s=0) == [orphan]
    left = [k for k in objects_under(client, BUCKET, s3_env.prefix) if k.startswith("versions/")]
    assert left == [store._state("sst2")["versions"][0]["object"]] and version_id(store.read("sst2")) == v


def test_writers_racing_to_store_the_same_bytes_leave_one_version_and_one_object(s3_env):
    stores = [open_store(s3_env.location, tiny_spec()) for _ in range(4)]
    data, barrier, out = blob(7), threading.Barrier(4), []

    def put(s):
        barrier.wait()
        out.append(s.put("sst2", data).version)

    threads = [threading.Thread(target=put, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out == [version_id(data)] * 4 and len(stores[0].task("sst2").versions) == 1
    left = [k for k in objects_under(s3_env.client(), BUCKET, s3_env.prefix) if k.startswith("versions/")]
    assert len(left) == 1 and Path(left[0]).name.startswith(version_id(data))
