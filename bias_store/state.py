"""A task's state as plain data, and the pure transitions between states that every backend commits.

A state is a JSON object: `{"task", "active", "history", "versions"}` — `versions` the version entries oldest
first, `active` a version id or None, `history` the previously active versions (the rollback stack, oldest
first). A transition takes the current state (None: no such task) and returns the new state (None: the task is
gone) and its result; it never mutates its input, so a backend that loses a race can run it again on the
state it lost to (`backends/s3.py`), which makes every commit one step of a serial order.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

from bias_store.errors import NothingToRollBack, TaskNotFound, VersionActive, VersionNotFound

HISTORY_LIMIT = 64  # previously active versions kept for rollback
State = dict  # see the module docstring
Transition = Callable[[State | None, dict | None], tuple[State | None, object]]


@dataclass(frozen=True)
class VersionInfo:
    task: str
    version: str  # 16 hex digits of the content's sha256 (see `version_id`)
    created_at: str  # when the store received it (ISO 8601, UTC)
    size: int  # bytes
    labels: list[str] = field(default_factory=list)  # [] = regression (or a generation set)
    metrics: dict = field(default_factory=dict)  # from training, as the file's metadata says
    method: str = ""
    active: bool = False
    trained_at: str = ""  # the file's own created_at metadata
    kind: str = "classification"  # the file's metadata kind ("generation" sets have no head)


@dataclass(frozen=True)
class TaskInfo:
    name: str
    active: str | None
    versions: list[VersionInfo]  # oldest first
    history: list[str] = field(default_factory=list)  # previously active versions, oldest first (rollback pops)


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


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def new_entry(data: bytes, meta: dict[str, str]) -> dict:
    """The state entry of a validated bias set (backends may add where they keep the bytes)."""
    return {
        "version": version_id(data),
        "sha256": hashlib.sha256(data).hexdigest(),  # of the exact bytes stored; readers check it
        "created_at": now(),
        "size": len(data),
        "labels": json.loads(meta.get("labels", "[]")),
        "metrics": json.loads(meta.get("metrics", "{}")),
        "method": meta.get("method", ""),
        "trained_at": meta.get("created_at", ""),
        "kind": meta.get("kind", "classification"),
    }


def find(state: State | None, version: str) -> dict | None:
    return next((v for v in state["versions"] if v["version"] == version), None) if state else None


def version_ids(state: State) -> list[str]:
    return [v["version"] for v in state["versions"]]


def version_info(task: str, state: State, entry: dict) -> VersionInfo:
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
        kind=entry.get("kind", "classification"),
    )


def task_info(task: str, state: State) -> TaskInfo:
    versions = [version_info(task, state, e) for e in state["versions"]]
    return TaskInfo(task, state["active"], versions, list(state["history"]))


def added_and_dropped(old: State | None, new: State | None) -> tuple[list[dict], list[dict]]:
    """Entries `new` has that `old` lacks, and the reverse (by version id)."""
    before = {v["version"]: v for v in old["versions"]} if old else {}
    after = {v["version"]: v for v in new["versions"]} if new else {}
    return [e for v, e in after.items() if v not in before], [e for v, e in before.items() if v not in after]


def _activated(state: State, version: str) -> State:
    """`state` with `version` active and the previous active version pushed on the rollback history."""
    history = list(state["history"])
    if state["active"] and state["active"] != version:
        history.append(state["active"])
    return dict(state, active=version, history=history[-HISTORY_LIMIT:])


def _existing(task: str, state: State | None) -> State:
    if state is None:
        raise TaskNotFound(task)
    return state


# ---- the transitions: (state, entry) -> (new state, result) ----


def put(task: str, activate: bool) -> Transition:
    """Store `entry` (the same content again: keep the first, at most flip the pointer)."""

    def step(state: State | None, entry: dict | None):
        state = state or {"task": task, "active": None, "history": [], "versions": []}
        existing = find(state, entry["version"])
        if existing is None:
            state = dict(state, versions=state["versions"] + [entry])
            existing = entry
        if activate and state["active"] != entry["version"]:
            state = _activated(state, entry["version"])
        return state, version_info(task, state, existing)

    return step


def activate(task: str, version: str) -> Transition:
    def step(state: State | None, _entry=None):
        state = _existing(task, state)
        entry = find(state, version)
        if entry is None:
            raise VersionNotFound(task, version, version_ids(state))
        if state["active"] != version:
            state = _activated(state, version)
        return state, version_info(task, state, entry)

    return step


def rollback(task: str) -> Transition:
    """Back to the previously active version (deleted versions left the history when they were deleted)."""

    def step(state: State | None, _entry=None):
        state = _existing(task, state)
        history = [v for v in state["history"] if find(state, v) is not None]
        while history and history[-1] == state["active"]:
            history.pop()
        if not history:
            raise NothingToRollBack(task)
        state = dict(state, active=history[-1], history=history[:-1])
        return state, version_info(task, state, find(state, state["active"]))

    return step


def delete_version(task: str, version: str, force: bool) -> Transition:
    """Remove one version; the active one only with `force` (the previous active one takes over). Deleting a
    task's last version deletes the task."""

    def step(state: State | None, _entry=None):
        state = _existing(task, state)
        if find(state, version) is None:
            raise VersionNotFound(task, version, version_ids(state))
        if state["active"] == version and not force:
            raise VersionActive(task, version)
        versions = [v for v in state["versions"] if v["version"] != version]
        if not versions:
            return None, None
        history = [v for v in state["history"] if v != version]
        active = state["active"]
        if active == version:
            active = history.pop() if history else None
        return dict(state, versions=versions, history=history, active=active), None

    return step


def delete_task(task: str) -> Transition:
    def step(state: State | None, _entry=None):
        _existing(task, state)
        return None, None

    return step
