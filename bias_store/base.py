"""`Store`: the one API of the bias store, whatever keeps the bytes (`backends/local.py`, `backends/s3.py`).

What is the same on every backend lives here: validation before a byte is written, the transitions of
`state.py`, the read-side views (`TaskInfo`, `VersionInfo`), audit records. A backend supplies how states are
read, how one change is committed atomically, how version bytes are kept, and the change feed.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod

from bitfit.bias_set import BiasSet, read_metadata
from bitfit.errors import BiasSetFormatError
from bitfit.spec import ServingSpec
from bias_store import state as st
from bias_store.errors import InvalidBiasSet, PayloadTooLarge, StoreDamaged, TaskNotFound, VersionNotFound
from bias_store.names import check_task_name
from bias_store.state import TaskInfo, VersionInfo
from bias_store.validate import validate

DEFAULT_MAX_BYTES = 16 * 2**20
AUDIT_LIMIT = 100  # records `audit()` returns unless asked for more
MAX_AUDIT_RECORD = 8 * 1024  # bytes of one record as JSON


class Store(ABC):
    """Validated, immutable, content-addressed versions of bias sets, with an active version per task."""

    location: str  # where it is: a directory path, or s3://BUCKET/PREFIX
    spec: ServingSpec | None  # what an upload must match to be served; None: offline tools, skip those checks
    max_bytes: int

    # ---- change detection ----

    @abstractmethod
    def generation(self) -> int:
        """Moves on every committed change (by any process on any machine), never on reads or refusals."""

    @abstractmethod
    def changes_since(self, generation: int) -> tuple[int, list[str] | None]:
        """(current generation, tasks changed after `generation`, sorted); None instead of the list when the
        store cannot say (too far back, or the generation is not one of this store's): rescan every task."""

    # ---- reading ----

    def tasks(self) -> list[TaskInfo]:
        return [st.task_info(name, s) for name, s in sorted(self._all_states().items())]

    def task(self, task: str) -> TaskInfo:
        return st.task_info(task, self._state_or_raise(task))

    def active_versions(self) -> dict[str, str]:
        """task -> active version, for every task that has one."""
        return {name: s["active"] for name, s in sorted(self._all_states().items()) if s["active"]}

    def read(self, task: str, version: str | None = None) -> bytes:
        """The bytes of a version (None: the active one), checked against their content hash."""
        return self._read(task, version)[1]

    def load(self, task: str, version: str | None = None) -> tuple[VersionInfo, BiasSet]:
        info, data = self._read(task, version)
        try:
            return info, BiasSet.from_bytes(data)
        except BiasSetFormatError as e:  # validated on the way in, so only a damaged store gets here
            raise StoreDamaged(f"version {info.version} of task {task!r} in the store at {self.location} "
                               f"cannot be read: {e}") from None

    # ---- changes: each one atomic commit ----

    def put(self, task: str, data: bytes, *, activate: bool = True) -> VersionInfo:
        """Validate and store a bias set; the same bytes twice give the same version and change nothing."""
        check_task_name(task)
        data = self._validated(task, data)
        return self._change(task, st.put(task, activate), new=(st.new_entry(data, read_metadata(data)), data))

    def activate(self, task: str, version: str) -> VersionInfo:
        return self._change(task, st.activate(task, version))

    def rollback(self, task: str) -> VersionInfo:
        """Back to the previously active version; `NothingToRollBack` when there is none."""
        return self._change(task, st.rollback(task))

    def delete_version(self, task: str, version: str, *, force: bool = False) -> None:
        """Remove one version; the active one only with `force` (the previous active one takes over).

        Deleting a task's last version deletes the task.
        """
        self._change(task, st.delete_version(task, version, force))

    def delete_task(self, task: str) -> None:
        self._change(task, st.delete_task(task))

    # ---- audit log ----

    @abstractmethod
    def append_audit(self, record: dict) -> dict:
        """Append one record durably (returned as stored: a `time` is added when it has none)."""

    @abstractmethod
    def audit(self, task: str | None = None, limit: int = AUDIT_LIMIT) -> list[dict]:
        """The newest `limit` records (of `task`, if given), newest first."""

    # ---- what a backend supplies ----

    @abstractmethod
    def _all_states(self) -> dict[str, st.State]:
        """Every task's current state."""

    @abstractmethod
    def _state(self, task: str) -> st.State | None:
        """One task's current state (None: no such task); `task` is a valid name."""

    @abstractmethod
    def _read(self, task: str, version: str | None) -> tuple[VersionInfo, bytes]:
        """A version's info and bytes, the bytes checked against the entry's sha256."""

    @abstractmethod
    def _change(self, task: str, transition: st.Transition, *, new: tuple[dict, bytes] | None = None):
        """Run `transition` on the task's state and commit the result atomically (nothing when it equals the
        old state); `new` is the entry and bytes of an upload, written before the commit that lists them."""

    # ---- shared helpers ----

    def _validated(self, task: str, data) -> bytes:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InvalidBiasSet([f"a bias set must be bytes, got {type(data).__name__}"])
        data = bytes(data)
        if len(data) > self.max_bytes:
            raise PayloadTooLarge(len(data), self.max_bytes)
        problems = validate(data, self.spec, max_bytes=self.max_bytes, task=task)
        if problems:
            raise InvalidBiasSet(problems)
        return data

    def _state_or_raise(self, task: str) -> st.State:
        check_task_name(task)
        state = self._state(task)
        if state is None:
            raise TaskNotFound(task)
        return state

    def _entry_for(self, task: str, state: st.State, version: str | None) -> dict:
        v = version if version is not None else state["active"]
        if v is None:
            raise VersionNotFound(task, "active", message=f"task {task!r} has no active version; activate one")
        entry = st.find(state, v)
        if entry is None:
            raise VersionNotFound(task, v, st.version_ids(state))
        return entry

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.location!r})"


def audit_record(record: dict) -> dict:
    """`record` as it is stored: a JSON object of at most MAX_AUDIT_RECORD bytes, with a `time`."""
    if not isinstance(record, dict):
        raise TypeError(f"an audit record must be a dict, got {type(record).__name__}")
    record = {"time": st.now()} | record
    line = json.dumps(record, separators=(",", ":"), sort_keys=True)
    if len(line) > MAX_AUDIT_RECORD:
        raise ValueError(f"audit record is {len(line):,} bytes as JSON, over the limit of {MAX_AUDIT_RECORD:,}")
    return record


def check_limit(limit: int) -> int:
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise ValueError(f"limit must be a positive integer, got {limit!r}")
    return limit


def changes_in(feed: list[tuple[int, str]], current: int, since: int) -> tuple[int, list[str] | None]:
    """`changes_since` over a feed of (generation, task) holding every change after its first entry's
    predecessor up to `current`; "*" as a task means "unknown task"."""
    if since == current:
        return current, []
    if since > current or not feed or feed[0][0] > since + 1:
        return current, None
    tasks = {t for g, t in feed if g > since}
    return current, None if "*" in tasks else sorted(tasks)
