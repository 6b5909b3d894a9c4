"""BiasStore: validated, immutable, content-addressed versions of bias sets, one directory per task.

On disk (all names chosen so that no task name, which is `[a-z0-9][a-z0-9_-]*`, can clash):

    root/.lock                          filelock: held by every mutation, in any process
    root/GENERATION                     integer, replaced after every successful mutation
    root/.dirty                         exists while a mutation may have committed but not yet moved GENERATION
    root/<task>/STATE.json              the task's commit point: versions, active version, activation history
    root/<task>/versions/<v>.safetensors  immutable files; <v> = 16 hex digits of the content's sha256
    .tmp-*  .trash-*                    leftovers of interrupted writes and deletes; removed on open

Each mutation is one atomic rename of a STATE.json (or of the task directory, for a task delete): a version
file is written and renamed into place before the STATE that lists it, and unlinked only after the STATE that
drops it. A crash at any point therefore leaves the old state or the new one; a version file that no STATE
lists is a leftover, never a version, and the next store to open removes it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from filelock import FileLock, Timeout

from bitfit.bias_set import BiasSet, read_metadata
from bitfit.errors import BiasSetFormatError
from bitfit.spec import ServingSpec
from bias_store.atomic import atomic_rename, atomic_write, fsync_dir, is_temp
from bias_store.errors import (
    InvalidBiasSet,
    PayloadTooLarge,
    StoreError,
    StoreLocked,
    TaskNotFound,
    VersionActive,
    VersionNotFound,
)
from bias_store.names import check_task_name, task_name_problem
from bias_store.validate import validate

STATE, VERSIONS, SUFFIX = "STATE.json", "versions", ".safetensors"
GENERATION, LOCK, DIRTY, TRASH_PREFIX = "GENERATION", ".lock", ".dirty", ".trash-"
HISTORY_LIMIT = 64  # previously active versions kept for rollback
DEFAULT_MAX_BYTES = 16 * 2**20


@dataclass(frozen=True)
class VersionInfo:
    task: str
    version: str  # 16 hex digits of the content's sha256 (see `version_id`)
    created_at: str  # when the store received it (ISO 8601, UTC)
    size: int  # bytes
    labels: list[str] = field(default_factory=list)  # [] = regression
    metrics: dict = field(default_factory=dict)  # from training, as the file's metadata says
    method: str = ""
    active: bool = False
    trained_at: str = ""  # the file's own created_at metadata


@dataclass(frozen=True)
class TaskInfo:
    name: str
    active: str | None
    versions: list[VersionInfo]  # oldest first


def version_id(data: bytes) -> str:
    """The version a (validated) bias set gets: 16 hex digits of the sha256 of its content.

    The content is the header with its keys sorted, then the tensor bytes: safetensors writes metadata keys
    in arbitrary order, so one bias set saved twice gives two byte strings but one version.
    """
    n = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    h = hashlib.sha256(len(header).to_bytes(8, "little"))
    h.update(header)
    h.update(memoryview(data)[8 + n :])
    return h.hexdigest()[:16]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class BiasStore:
    def __init__(
        self,
        root: str | Path,
        spec: ServingSpec | None = None,  # what an upload must match to be served; None: offline, skip those checks
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        lock_timeout: float = 60.0,
    ):
        self.root = Path(root)
        self.spec, self.max_bytes = spec, max_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(self.root / LOCK), timeout=lock_timeout)
        self._lock_timeout = lock_timeout
        with self._locked():
            self._recover()

    # ---- reading (no lock: every file a reader opens is replaced atomically) ----

    def generation(self) -> int:
        """Changes after every successful mutation; one small file read."""
        if (self.root / DIRTY).exists():
            self._repair_generation()
        try:
            return int((self.root / GENERATION).read_text() or 0)
        except FileNotFoundError:
            return 0

    def tasks(self) -> list[TaskInfo]:
        out = []
        for name in self._task_names():
            state = self._read_state(name)
            if state is not None:
                out.append(self._task_info(name, state))
        return out

    def task(self, task: str) -> TaskInfo:
        return self._task_info(task, self._state_or_raise(task))

    def active_versions(self) -> dict[str, str]:
        """task -> active version, for every task that has one."""
        out = {}
        for name in self._task_names():
            state = self._read_state(name)
            if state is not None and state["active"]:
                out[name] = state["active"]
        return out

    def read(self, task: str, version: str | None = None) -> bytes:
        """The bytes of a version (None: the active one), checked against their content hash."""
        return self._read(task, version)[1]

    def load(self, task: str, version: str | None = None) -> tuple[VersionInfo, BiasSet]:
        info, data = self._read(task, version)
        try:
            return info, BiasSet.from_bytes(data)
        except BiasSetFormatError as e:  # validated on the way in, so only a damaged store gets here
            raise StoreError(f"version {info.version} of task {task!r} cannot be read: {e}") from None

    # ---- mutations (each under the store lock, each committed by one rename) ----

    def put(self, task: str, data: bytes, *, activate: bool = True) -> VersionInfo:
        """Validate and store a bias set; the same bytes twice give the same version and change nothing."""
        check_task_name(task)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InvalidBiasSet([f"a bias set must be bytes, got {type(data).__name__}"])
        data = bytes(data)
        if len(data) > self.max_bytes:
            raise PayloadTooLarge(len(data), self.max_bytes)
        problems = validate(data, self.spec, max_bytes=self.max_bytes, task=task)
        if problems:
            raise InvalidBiasSet(problems)
        version, digest = version_id(data), hashlib.sha256(data).hexdigest()
        meta = read_metadata(data)
        with self._locked():
            state = self._read_state(task) or {"task": task, "active": None, "history": [], "versions": []}
            entry = _find(state, version)
            if entry is not None:  # the same content again: keep the first file, at most flip the pointer
                if activate and state["active"] != version:
                    self._commit(task, _activated(state, version))
                    state = self._read_state(task)
                return self._version_info(task, state, _find(state, version))
            versions_dir = self.root / task / VERSIONS
            if not versions_dir.is_dir():
                versions_dir.mkdir(parents=True)
                fsync_dir(self.root)
            atomic_write(versions_dir / (version + SUFFIX), data)
            entry = {
                "version": version,
                "sha256": digest,
                "created_at": _now(),
                "size": len(data),
                "labels": json.loads(meta["labels"]),
                "metrics": json.loads(meta.get("metrics", "{}")),
                "method": meta["method"],
                "trained_at": meta.get("created_at", ""),
            }
            new = dict(state, versions=state["versions"] + [entry])
            self._commit(task, _activated(new, version) if activate else new)
            return self._version_info(task, new | ({"active": version} if activate else {}), entry)

    def activate(self, task: str, version: str) -> VersionInfo:
        with self._locked():
            state = self._state_or_raise(task)
            entry = _find(state, version)
            if entry is None:
                raise VersionNotFound(task, version, [v["version"] for v in state["versions"]])
            if state["active"] != version:
                state = _activated(state, version)
                self._commit(task, state)
            return self._version_info(task, state, entry)

    def rollback(self, task: str) -> VersionInfo:
        """Back to the previously active version."""
        with self._locked():
            state = self._state_or_raise(task)
            history = [v for v in state["history"] if _find(state, v) is not None]
            while history and history[-1] == state["active"]:
                history.pop()
            if not history:
                raise StoreError(f"task {task!r} has no previously active version to roll back to")
            state = dict(state, active=history[-1], history=history[:-1])
            self._commit(task, state)
            return self._version_info(task, state, _find(state, state["active"]))

    def delete_version(self, task: str, version: str, *, force: bool = False) -> None:
        """Remove one version; the active one only with `force` (the previous active one takes over).

        Deleting a task's last version deletes the task.
        """
        with self._locked():
            state = self._state_or_raise(task)
            if _find(state, version) is None:
                raise VersionNotFound(task, version, [v["version"] for v in state["versions"]])
            if state["active"] == version and not force:
                raise VersionActive(task, version)
            versions = [v for v in state["versions"] if v["version"] != version]
            if not versions:
                self._delete_task_locked(task)
                return
            history = [v for v in state["history"] if v != version]
            active = state["active"]
            if active == version:
                active = history.pop() if history else None
            self._commit(task, dict(state, versions=versions, history=history, active=active))
            path = self.root / task / VERSIONS / (version + SUFFIX)
            path.unlink(missing_ok=True)
            fsync_dir(path.parent)

    def delete_task(self, task: str) -> None:
        with self._locked():
            self._state_or_raise(task)
            self._delete_task_locked(task)

    # ---- internals ----

    @contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self._lock.acquire()
        except Timeout:
            raise StoreLocked(
                f"the store at {self.root} stayed locked by another process for {self._lock_timeout:g} s; "
                "try again, or check for a hung process holding it"
            ) from None
        try:
            yield
        finally:
            self._lock.release()

    def _commit(self, task: str, state: dict) -> None:
        """Replace a task's STATE (the commit point), then move the generation. Call under the lock."""
        self._mark_dirty()
        atomic_write(self.root / task / STATE, json.dumps(state, indent=1).encode())
        self._bump_generation()

    def _delete_task_locked(self, task: str) -> None:
        self._mark_dirty()
        trash = self.root / f"{TRASH_PREFIX}{task}-{uuid.uuid4().hex[:8]}"
        atomic_rename(self.root / task, trash)  # the commit point: the task is gone in one step
        shutil.rmtree(trash, ignore_errors=True)
        self._bump_generation()

    def _mark_dirty(self) -> None:
        # Readers poll GENERATION; if we die between a commit and the bump, the marker tells the next
        # process to move it, so no reader keeps serving a state that has changed under it. (No fsync:
        # after a power loss every server restarts and reloads everything anyway.)
        (self.root / DIRTY).touch()

    def _bump_generation(self) -> None:
        try:
            current = int((self.root / GENERATION).read_text() or 0)
        except FileNotFoundError:
            current = 0
        atomic_write(self.root / GENERATION, str(current + 1).encode())
        (self.root / DIRTY).unlink(missing_ok=True)

    def _repair_generation(self) -> None:
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            return  # a writer is mid-mutation and will move the generation itself
        except OSError:
            return  # read-only store: nothing we can repair
        try:
            if (self.root / DIRTY).exists():
                self._bump_generation()
        finally:
            self._lock.release()

    def _recover(self) -> None:
        """Remove leftovers of interrupted writes and deletes. Call under the lock (so no write is live)."""
        cleaned = False
        for entry in list(self.root.iterdir()):
            if is_temp(entry.name) or entry.name.startswith(TRASH_PREFIX):
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                cleaned = True
            elif entry.is_dir() and task_name_problem(entry.name) is None:
                cleaned |= self._recover_task(entry)
        if cleaned or (self.root / DIRTY).exists():
            self._bump_generation()

    def _recover_task(self, task_dir: Path) -> bool:
        state = self._read_state(task_dir.name)
        if state is None:  # a first upload died before its commit
            shutil.rmtree(task_dir, ignore_errors=True)
            return True
        cleaned = False
        listed = {v["version"] + SUFFIX for v in state["versions"]}
        for d in (task_dir, task_dir / VERSIONS):
            for f in list(d.iterdir()) if d.is_dir() else []:
                if is_temp(f.name) or (d.name == VERSIONS and f.name not in listed):
                    f.unlink(missing_ok=True)
                    cleaned = True
        return cleaned

    def _task_names(self) -> list[str]:
        return sorted(
            e.name for e in self.root.iterdir() if task_name_problem(e.name) is None and (e / STATE).is_file()
        )

    def _read_state(self, task: str) -> dict | None:
        try:
            text = (self.root / task / STATE).read_text()
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise StoreError(f"{self.root / task / STATE} is damaged ({e}); restore it from a backup") from None

    def _state_or_raise(self, task: str) -> dict:
        check_task_name(task)
        state = self._read_state(task)
        if state is None:
            raise TaskNotFound(task)
        return state

    def _read(self, task: str, version: str | None) -> tuple[VersionInfo, bytes]:
        for _attempt in range(3):  # a concurrent delete may remove the file between STATE and open
            state = self._state_or_raise(task)
            v = version if version is not None else state["active"]
            if v is None:
                raise VersionNotFound(task, "active", message=f"task {task!r} has no active version; activate one")
            entry = _find(state, v)
            if entry is None:
                raise VersionNotFound(task, v, [e["version"] for e in state["versions"]])
            try:
                data = (self.root / task / VERSIONS / (v + SUFFIX)).read_bytes()
            except FileNotFoundError:
                continue
            if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                raise StoreError(f"version {v} of task {task!r} is damaged on disk (content hash mismatch)")
            return self._version_info(task, state, entry), data
        raise VersionNotFound(task, version or "active")

    def _task_info(self, task: str, state: dict) -> TaskInfo:
        versions = [self._version_info(task, state, e) for e in state["versions"]]
        return TaskInfo(task, state["active"], versions)

    @staticmethod
    def _version_info(task: str, state: dict, entry: dict) -> VersionInfo:
        return VersionInfo(
            task=task,
            version=entry["version"],
            created_at=entry["created_at"],
            size=entry["size"],
            labels=list(entry["labels"]),
            metrics=dict(entry["metrics"]),
            method=entry["method"],
            active=state["active"] == entry["version"],
            trained_at=entry.get("trained_at", ""),
        )


def _find(state: dict, version: str) -> dict | None:
    return next((v for v in state["versions"] if v["version"] == version), None)


def _activated(state: dict, version: str) -> dict:
    """`state` with `version` active and the previous active version pushed on the rollback history."""
    history = list(state["history"])
    if state["active"] and state["active"] != version:
        history.append(state["active"])
    return dict(state, active=version, history=history[-HISTORY_LIMIT:])
