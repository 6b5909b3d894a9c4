"""S3Store: the bias store on S3-compatible object storage, shared by many machines with no lock server.

Objects under the store's prefix:

    log/<g:020d>.json                     commit g: one task's whole new state (or null: task deleted), sealed
    checkpoints/<g:020d>.json             every task's state as of commit g, every `checkpoint_every` commits
    versions/<task>/<v>-<nonce>.safetensors  immutable bytes of version <v>, one object per upload
    audit/<inverted µs>-<nonce>-<task>.json  one audit record; the inverted time lists newest first
    probes/<nonce>                        a moment's object: open checks the server honours put-if-absent

The log is the commit point and the change feed at once. A change is committed by writing the next log
entry with put-if-absent (`If-None-Match: *`), which exactly one writer wins; the entry holds the new state
of the one task it changes, computed from every entry before it. A loser re-reads the entries it missed and
runs its transition again on the state it lost to (`state.py`: transitions are pure), so every commit is one
step of a serial order and no acknowledged change is overwritten. A writer killed before its log write left
nothing but an unreferenced upload (removed by `collect_garbage`, after a grace period); after it, the new
state is committed. Each store keeps every task's state in memory, replayed from the newest checkpoint and
the log; a poll (`generation`, `changes_since`, any read) is one LIST of the log after the last entry it
has, whatever the number of tasks, and fetches only the new entries. Log entries and checkpoints carry the
sha256 of their body, version objects are checked against the sha256 their entry records.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import random
import threading
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor

from bitfit.spec import ServingSpec
from bias_store import state as st
from bias_store.backends.s3_objects import REFUSED, Objects, Timeouts, make_client
from bias_store.base import AUDIT_LIMIT, DEFAULT_MAX_BYTES, Store, audit_record, changes_in, check_limit
from bias_store.errors import StoreConflict, StoreDamaged, StoreMisconfigured, StoreUnavailable
from bias_store.names import check_task_name, task_name_problem
from bias_store.state import VersionInfo

log = logging.getLogger(__name__)

LOG, CHECKPOINTS, VERSIONS, AUDIT, PROBES = "log/", "checkpoints/", "versions/", "audit/", "probes/"
CHECKPOINT_EVERY = 100  # a new store replays at most this many log entries after the newest checkpoint
CHECKPOINTS_KEPT = 2
GC_GRACE_S = 3600.0  # an unreferenced upload younger than this may belong to a writer still committing
FRESH_UPLOAD_S = 600.0  # a writer redoes an upload older than this before committing it (well inside the grace)
FEED_LENGTH = 4096  # changes a store remembers for `changes_since`
PAGE = 1000  # keys per LIST request (the S3 maximum)
US_MAX = 10**16 - 1  # audit keys hold US_MAX - microseconds since the epoch: ascending keys, newest first


def log_key(g: int) -> str:
    return f"{LOG}{g:020d}.json"


def checkpoint_key(g: int) -> str:
    return f"{CHECKPOINTS}{g:020d}.json"


def number_of(key: str, under: str) -> int | None:
    name = key[len(under):].removesuffix(".json")
    return int(name) if key.startswith(under) and len(name) == 20 and name.isdigit() else None


def seal(body: dict) -> bytes:
    """`body` with the sha256 of its canonical JSON, which `unseal` checks."""
    return json.dumps({"body": body, "sha256": _digest(body)}, sort_keys=True).encode()


def unseal(data: bytes, what: str) -> dict:
    try:
        sealed = json.loads(data)
        body, digest = sealed["body"], sealed["sha256"]
    except (ValueError, KeyError, TypeError):
        raise StoreDamaged(f"{what} is not a sealed JSON object; restore it from a backup") from None
    if _digest(body) != digest:
        raise StoreDamaged(f"{what} is damaged (content hash mismatch); restore it from a backup")
    return body


def _digest(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class S3Store(Store):
    """The S3 backend; `open_store("s3://BUCKET/PREFIX", spec)` builds one from the standard AWS variables."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        spec: ServingSpec | None = None,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        client=None,  # a boto3 S3 client; default: from endpoint_url/region/profile, else the environment
        endpoint_url: str | None = None,
        region: str | None = None,
        profile: str | None = None,
        timeouts: Timeouts = Timeouts(),
        checkpoint_every: int = CHECKPOINT_EVERY,
        commit_timeout_s: float = 30.0,  # a writer that keeps losing races gives up (StoreConflict) after this
        max_attempts: int | None = None,  # ... or after this many lost races
        gc_grace_s: float | None = GC_GRACE_S,  # open removes unreferenced uploads older than this; None: not
        check_conditional_writes: bool = True,
    ):
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.location = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.spec, self.max_bytes = spec, max_bytes
        self.checkpoint_every, self.commit_timeout_s, self.max_attempts = checkpoint_every, commit_timeout_s, max_attempts
        client = client or make_client(endpoint_url=endpoint_url, region=region, profile=profile, timeouts=timeouts)
        self.objects = Objects(client, bucket, self.prefix)
        self.endpoint = self.objects.endpoint
        self._lock = threading.RLock()  # guards the replayed state below; held while fetching new entries
        self._g, self._states, self._feed = 0, {}, deque(maxlen=FEED_LENGTH)
        self._writer = uuid.uuid4().hex[:12]
        self.objects.check_bucket()
        if check_conditional_writes:
            self._check_conditional_writes()
        self._load_checkpoint()
        self._sync()
        if gc_grace_s is not None:
            self.collect_garbage(gc_grace_s)

    # ---- change detection ----

    def generation(self) -> int:
        """The number of the newest commit; one LIST request when nothing changed."""
        self._sync()
        return self._g

    def changes_since(self, generation: int) -> tuple[int, list[str] | None]:
        self._sync()
        with self._lock:
            return changes_in(list(self._feed), self._g, generation)

    # ---- audit: one object per record ----

    def append_audit(self, record: dict) -> dict:
        record = audit_record(record)
        task = record.get("task")
        segment = task if isinstance(task, str) and task_name_problem(task) is None else "_"
        key = f"{AUDIT}{US_MAX - time.time_ns() // 1000:016d}-{uuid.uuid4().hex[:8]}-{segment}.json"
        self.objects.put(key, json.dumps(record, sort_keys=True).encode())
        return record

    def audit(self, task: str | None = None, limit: int = AUDIT_LIMIT) -> list[dict]:
        check_limit(limit)
        keys, after = [], None
        while len(keys) < limit:
            page = self.objects.first(AUDIT, start_after=after, n=PAGE)
            keys += [k for k in page if task is None or k[len(AUDIT) + 26 : -len(".json")] == task]
            if len(page) < PAGE:
                break
            after = page[-1]
        records = [json.loads(d) for d in self._get_many(keys[:limit]) if d is not None]
        return [r for r in records if task is None or r.get("task") == task]

    # ---- garbage ----

    def collect_garbage(self, grace_s: float = GC_GRACE_S) -> list[str]:
        """Remove uploads no state lists (a writer died before its commit, or lost its race and died) and
        probe objects, older than `grace_s`; the keys removed. Listed before the state is read, so an upload
        committed meanwhile counts as listed."""
        cutoff = time.time() - grace_s
        candidates = [k for k, t in self.objects.list(VERSIONS) + self.objects.list(PROBES) if t < cutoff]
        self._sync()
        with self._lock:
            listed = {v["object"] for s in self._states.values() for v in s["versions"]}
        removed = [k for k in candidates if k not in listed]
        for key in removed:
            self.objects.delete(key)
        return removed

    # ---- reading: the replayed state, brought up to date first ----

    def _all_states(self) -> dict[str, st.State]:
        self._sync()
        with self._lock:
            return dict(self._states)  # states are never changed in place, only replaced

    def _state(self, task: str) -> st.State | None:
        self._sync()
        with self._lock:
            return self._states.get(task)

    def _read(self, task: str, version: str | None) -> tuple[VersionInfo, bytes]:
        check_task_name(task)
        for attempt in range(3):  # a concurrent delete may remove the object between the state and the GET
            with self._lock:
                known = self._states.get(task)
            if attempt == 0 and version is not None and st.find(known, version) is not None:
                state = known  # versions are immutable: a named one needs no LIST first (one GET per load)
            else:
                state = self._state_or_raise(task)
            entry = self._entry_for(task, state, version)
            data = self.objects.get(entry["object"])
            if data is None:
                continue
            if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                raise StoreDamaged(f"version {entry['version']} of task {task!r} in the store {self.location} is "
                                   f"damaged (content hash mismatch of {entry['object']}); delete the version")
            return st.version_info(task, state, entry), data
        raise StoreDamaged(f"version {entry['version']} of task {task!r} is listed in the store {self.location} but "
                           f"its object {entry['object']} is missing; delete the version")

    # ---- the commit: put-if-absent of the next log entry ----

    def _change(self, task: str, transition: st.Transition, *, new: tuple[dict, bytes] | None = None):
        check_task_name(task)
        upload, unknown, committed = None, False, None  # upload: (entry, when) of bytes this call wrote
        started = time.monotonic()
        try:
            for attempt in itertools.count(1):
                self._sync()
                with self._lock:
                    g, old = self._g, self._states.get(task)
                if upload and time.monotonic() - upload[1] > FRESH_UPLOAD_S:
                    self._forget(upload[0])  # so stale that garbage collection may take it: upload again
                    upload = None
                entry = None
                if new:
                    entry = upload[0] if upload else dict(new[0], object=self._version_key(task, new[0]["version"]))
                state, result = transition(old, entry)
                if state == old:
                    return result
                if entry is not None and st.find(state, entry["version"]) is entry and upload is None:
                    if not self.objects.put(entry["object"], new[1], if_absent=True):
                        raise StoreDamaged(f"{entry['object']} already exists in the store {self.location}")
                    upload = (entry, time.monotonic())
                commit = {"g": g + 1, "task": task, "state": state, "at": st.now(),
                          "writer": self._writer, "nonce": uuid.uuid4().hex}
                unknown = True  # from here until we know, the upload may be referenced by a commit
                won = self.objects.put(log_key(g + 1), seal(commit), if_absent=True) or self._is_ours(commit)
                unknown = False
                if won:
                    committed = state
                    self._committed(commit, old)
                    return result
                elapsed = time.monotonic() - started
                if elapsed > self.commit_timeout_s or (self.max_attempts and attempt >= self.max_attempts):
                    raise StoreConflict(
                        f"task {task!r}: other writers committed to the store {self.location} first, {attempt} "
                        f"time(s) in {elapsed:.1f} s; nothing of this change was committed, try again")
                time.sleep(random.uniform(0, min(0.1, 0.002 * 2**attempt)))
        finally:
            if upload and not unknown and (committed is None or st.find(committed, upload[0]["version"]) is not upload[0]):
                self._forget(upload[0])

    def _is_ours(self, commit: dict) -> bool:
        """After a refused put-if-absent: is the entry there our own? (A retried request whose first try
        landed but whose answer was lost is refused by the entry it wrote.)"""
        data = self.objects.get(log_key(commit["g"]))
        return data is not None and unseal(data, log_key(commit["g"])).get("nonce") == commit["nonce"]

    def _committed(self, commit: dict, old: st.State | None) -> None:
        g = commit["g"]
        with self._lock:
            if self._g == g - 1:
                self._apply(commit)
        _, dropped = st.added_and_dropped(old, commit["state"])
        for entry in dropped:  # no later state can list them: object keys are never reused
            self._forget(entry)
        if self.checkpoint_every and g % self.checkpoint_every == 0:
            self._checkpoint(g)

    def _forget(self, entry: dict) -> None:
        """Best effort: a failure leaves an unreferenced object for `collect_garbage`."""
        try:
            self.objects.delete(entry["object"])
        except StoreUnavailable as e:
            log.warning("left %s for garbage collection: %s", entry["object"], e)

    def _checkpoint(self, g: int) -> None:
        with self._lock:
            if self._g != g:
                return  # the replayed state is already past g; the next checkpoint will do
            body = {"g": g, "tasks": dict(self._states)}
        try:
            self.objects.put(checkpoint_key(g), seal(body), if_absent=True)
            numbered = sorted(n for k, _ in self.objects.list(CHECKPOINTS) if (n := number_of(k, CHECKPOINTS)) is not None)
            for n in numbered[:-CHECKPOINTS_KEPT]:
                self.objects.delete(checkpoint_key(n))
        except StoreUnavailable as e:
            log.warning("checkpoint %d of %s not written: %s", g, self.location, e)

    # ---- replaying ----

    def _load_checkpoint(self) -> None:
        numbered = sorted(n for k, _ in self.objects.list(CHECKPOINTS) if (n := number_of(k, CHECKPOINTS)) is not None)
        for n in reversed(numbered):  # the newest readable one; the log has everything after any of them
            data = self.objects.get(checkpoint_key(n))
            try:
                body = unseal(data, f"{checkpoint_key(n)} in {self.location}") if data is not None else None
            except StoreDamaged as e:
                log.warning("skipping a checkpoint: %s", e)
                continue
            if body is not None and body.get("g") == n:
                with self._lock:
                    self._g, self._states = n, dict(body["tasks"])
                return

    def _sync(self) -> None:
        """Replay the log entries after the last one applied."""
        with self._lock:
            numbers = []
            while True:
                page = self.objects.first(LOG, start_after=log_key(max(numbers, default=self._g)), n=PAGE)
                numbers += [n for k in page if (n := number_of(k, LOG)) is not None]
                if len(page) < PAGE:
                    break
            top = max(numbers, default=self._g)
            if top <= self._g:
                return
            wanted = list(range(self._g + 1, top + 1))  # the log has no gaps: g+1 is written by who saw g
            for g, data in zip(wanted, self._get_many([log_key(g) for g in wanted])):
                if data is None:
                    raise StoreDamaged(f"commit {g} is missing from the log of the store {self.location} while later "
                                       "ones exist; the log must never be edited")
                body = unseal(data, f"{log_key(g)} in {self.location}")
                if body.get("g") != g:
                    raise StoreDamaged(f"{log_key(g)} in {self.location} names commit {body.get('g')}")
                self._apply(body)

    def _apply(self, commit: dict) -> None:
        if commit["state"] is None:
            self._states.pop(commit["task"], None)
        else:
            self._states[commit["task"]] = commit["state"]
        self._g = commit["g"]
        self._feed.append((commit["g"], commit["task"]))

    def _get_many(self, keys: list[str]) -> list[bytes | None]:
        if len(keys) <= 2:
            return [self.objects.get(k) for k in keys]
        with ThreadPoolExecutor(min(8, len(keys))) as pool:
            return list(pool.map(self.objects.get, keys))

    def _version_key(self, task: str, version: str) -> str:
        return f"{VERSIONS}{task}/{version}-{uuid.uuid4().hex[:12]}.safetensors"

    def _check_conditional_writes(self) -> None:
        """Refuse a server that would let two writers both win a commit (it ignores If-None-Match)."""
        key = f"{PROBES}{uuid.uuid4().hex}"
        try:
            first = self.objects.put(key, b"probe", if_absent=True)
            second = self.objects.put(key, b"probe", if_absent=True)
            self.objects.delete(key)
        except StoreUnavailable as e:
            if getattr(e, "code", None) in REFUSED:
                log.warning("%s: no write access, so put-if-absent was not checked (%s)", self.location, e)
                return
            if getattr(e, "code", None) is None:
                raise
            raise StoreMisconfigured(f"the S3 endpoint {self.endpoint} refused a conditional write "
                                     f"(If-None-Match: *) to bucket {self.bucket!r}: {e}; the store's commits need "
                                     "put-if-absent (AWS S3, SeaweedFS and MinIO have it)") from None
        if not first or second:
            raise StoreMisconfigured(f"the S3 endpoint {self.endpoint} (bucket {self.bucket!r}) does not honour "
                                     "If-None-Match: * on PutObject (a second put-if-absent of one key succeeded); "
                                     "two writers could both commit, so the store refuses to open on it")
