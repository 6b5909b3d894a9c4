"""BiasStore: the directory backend (the embedded default), one directory per task.

On disk (all names chosen so that no task name, which is `[a-z0-9][a-z0-9_-]*`, can clash):

    root/.lock                          filelock: held by every mutation, in any process
    root/GENERATION                     first line the generation; then the last changes, "GENERATION TASK" each
    root/.dirty                         holds a task name while a mutation may have committed but not yet moved
                                        GENERATION
    root/AUDIT.jsonl                    the audit log, one JSON object a line, appended and fsynced
    root/<task>/STATE.json              the task's commit point: versions, active version, activation history
    root/<task>/versions/<v>.safetensors  immutable files; <v> = 16 hex digits of the content's sha256
    .tmp-*  .trash-*                    leftovers of interrupted writes and deletes; removed on open

Each mutation is one atomic rename of a STATE.json (or of the task directory, for a task delete): a version
file is written and renamed into place before the STATE that lists it, and unlinked only after the STATE that
drops it. A crash therefore leaves the old state or the new one; a version file that no STATE lists is a
leftover, never a version, and the next store to open removes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from bitfit.spec import ServingSpec
from bias_store import state as st
from bias_store.atomic import atomic_rename, atomic_write, fsync_dir, is_temp
from bias_store.base import AUDIT_LIMIT, DEFAULT_MAX_BYTES, Store, audit_record, changes_in, check_limit
from bias_store.errors import StoreDamaged, StoreLocked
from bias_store.names import check_task_name, task_name_problem
from bias_store.state import VersionInfo

STATE, VERSIONS, SUFFIX = "STATE.json", "versions", ".safetensors"
GENERATION, LOCK, DIRTY, TRASH_PREFIX, AUDIT = "GENERATION", ".lock", ".dirty", ".trash-", "AUDIT.jsonl"
FEED_LENGTH = 256  # changes GENERATION remembers for `changes_since`


class BiasStore(Store):
    """The directory backend; `open_store` picks it for a path. Several processes may share one directory."""

    def __init__(
        self,
        root: str | Path,
        spec: ServingSpec | None = None,  # what an upload must match to be served; None: offline, skip those checks
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        lock_timeout: float = 60.0,
    ):
        self.root = Path(root)
        self.location = str(self.root)
        self.spec, self.max_bytes = spec, max_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(self.root / LOCK), timeout=lock_timeout)
        self._lock_timeout = lock_timeout
        with self._locked():
            self._recover()

    # ---- change detection (no lock: GENERATION is replaced atomically) ----

    def generation(self) -> int:
        """Changes after every successful mutation; one small file read."""
        return self._feed()[0]

    def changes_since(self, generation: int) -> tuple[int, list[str] | None]:
        current, feed = self._feed()
        return changes_in(feed, current, generation)

    # ---- audit ----

    def append_audit(self, record: dict) -> dict:
        record = audit_record(record)
        line = json.dumps(record, separators=(",", ":"), sort_keys=True) + "\n"
        with self._locked():
            fd = os.open(self.root / AUDIT, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":  # a torn last line (power loss): end it first
                    line = "\n" + line
                os.write(fd, line.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
        return record

    def audit(self, task: str | None = None, limit: int = AUDIT_LIMIT) -> list[dict]:
        check_limit(limit)
        try:
            lines = (self.root / AUDIT).read_text(encoding="utf-8", errors="replace").splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in reversed(lines):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn line; every complete one was fsynced before its append returned
            if isinstance(record, dict) and (task is None or record.get("task") == task):
                out.append(record)
                if len(out) == limit:
                    break
        return out

    # ---- what the base class reads (no lock: every file a reader opens is replaced atomically) ----

    def _all_states(self) -> dict[str, st.State]:
        out = {}
        for name in self._task_names():
            state = self._read_state(name)
            if state is not None:
                out[name] = state
        return out

    def _state(self, task: str) -> st.State | None:
        return self._read_state(task)

    def _read(self, task: str, version: str | None) -> tuple[VersionInfo, bytes]:
        for _attempt in range(2):  # a concurrent delete may remove the file between STATE and open
            state = self._state_or_raise(task)
            entry = self._entry_for(task, state, version)
            v = entry["version"]
            try:
                data = (self.root / task / VERSIONS / (v + SUFFIX)).read_bytes()
            except FileNotFoundError:
                continue
            if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                raise StoreDamaged(f"version {v} of task {task!r} in the store at {self.root} is damaged on disk "
                                   "(content hash mismatch); restore the file from a backup or delete the version")
            return st.version_info(task, state, entry), data
        raise StoreDamaged(f"version {v} of task {task!r} is listed in {self.root / task / STATE} but its file "
                           "is missing; restore it from a backup or delete the version")

    # ---- the commit (under the store lock, by one rename) ----

    def _change(self, task: str, transition: st.Transition, *, new: tuple[dict, bytes] | None = None):
        check_task_name(task)
        with self._locked():
            old = self._read_state(task)
            state, result = transition(old, new[0] if new else None)
            if state == old:
                return result
            added, dropped = st.added_and_dropped(old, state)
            if added:  # only an upload adds, and only its own entry
                versions_dir = self.root / task / VERSIONS
                if not versions_dir.is_dir():
                    versions_dir.mkdir(parents=True)
                    fsync_dir(self.root)
                atomic_write(versions_dir / (added[0]["version"] + SUFFIX), new[1])
            if state is None:
                self._delete_task_locked(task)
                return result
            self._commit(task, state)
            for entry in dropped:
                path = self.root / task / VERSIONS / (entry["version"] + SUFFIX)
                path.unlink(missing_ok=True)
                fsync_dir(path.parent)
            return result

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
        self._mark_dirty(task)
        atomic_write(self.root / task / STATE, json.dumps(state, indent=1).encode())
        self._bump_generation(task)

    def _delete_task_locked(self, task: str) -> None:
        self._mark_dirty(task)
        trash = self.root / f"{TRASH_PREFIX}{task}-{uuid.uuid4().hex[:8]}"
        atomic_rename(self.root / task, trash)  # the commit point: the task is gone in one step
        shutil.rmtree(trash, ignore_errors=True)
        self._bump_generation(task)

    def _mark_dirty(self, task: str) -> None:
        # Readers poll GENERATION; if we die between a commit and the bump, the marker tells the next
        # process to move it (naming the task for `changes_since`), so no reader keeps serving a state that
        # has changed under it. (No fsync: after a power loss every server restarts and reloads anyway.)
        (self.root / DIRTY).write_text(task)

    def _feed(self) -> tuple[int, list[tuple[int, str]]]:
        """(generation, the last changes as (generation, task)), repairing a commit whose bump was lost."""
        if (self.root / DIRTY).exists():
            self._repair_generation()
        return self._read_feed()

    def _read_feed(self) -> tuple[int, list[tuple[int, str]]]:
        try:
            lines = (self.root / GENERATION).read_text().split("\n")
        except FileNotFoundError:
            return 0, []
        try:
            current = int(lines[0] or 0)
            feed = [(int(g), t) for g, t in (line.split(" ", 1) for line in lines[1:] if line)]
        except ValueError:
            raise StoreDamaged(f"{self.root / GENERATION} is damaged; delete it (the next change rewrites it)") from None
        return current, feed

    def _bump_generation(self, task: str) -> None:
        current, feed = self._read_feed()
        feed = (feed + [(current + 1, task)])[-FEED_LENGTH:]
        atomic_write(self.root / GENERATION, "\n".join([str(current + 1)] + [f"{g} {t}" for g, t in feed]).encode())
        (self.root / DIRTY).unlink(missing_ok=True)

    def _dirty_task(self) -> str:
        try:
            task = (self.root / DIRTY).read_text().strip()
        except FileNotFoundError:
            task = ""
        return task if task_name_problem(task) is None else "*"

    def _repair_generation(self) -> None:
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            return  # a writer is mid-mutation and will move the generation itself
        except OSError:
            return  # read-only store: nothing we can repair
        try:
            if (self.root / DIRTY).exists():
                self._bump_generation(self._dirty_task())
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
        if (self.root / DIRTY).exists():
            self._bump_generation(self._dirty_task())
        elif cleaned:
            self._bump_generation("*")

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
            raise StoreDamaged(f"{self.root / task / STATE} is damaged ({e}); restore it from a backup") from None

