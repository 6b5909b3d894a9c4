"""Typed errors of the store; the server maps each type to one status code (`server/errors.py`).

Every message says what is wrong and what to do about it, because it reaches the person who uploaded. The
messages speak of the store (tasks, versions, the location), never of the HTTP routes that may have led here.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base of every error the store raises on purpose."""


class TaskNotFound(StoreError):
    """No task of that name is in the store."""

    def __init__(self, task: str):
        self.task = task
        super().__init__(f"task {task!r} is not in the store; store a bias set for it first")


class VersionNotFound(StoreError):
    """The task exists but has no version of that id."""

    def __init__(self, task: str, version: str, known: list[str] | None = None, *, message: str | None = None):
        self.task, self.version = task, version
        hint = f"; its versions are {known}" if known else ""
        super().__init__(message or f"task {task!r} has no version {version!r}{hint}")


class InvalidTaskName(StoreError, ValueError):
    """A task name outside the strict pattern (it becomes a directory name or an object key)."""


class InvalidBiasSet(StoreError, ValueError):
    """An upload failed validation; `problems` lists every reason, one sentence each."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid bias set: " + "; ".join(self.problems))


class PayloadTooLarge(StoreError, ValueError):
    """An upload is larger than the store's configured limit."""

    def __init__(self, size: int, max_bytes: int):
        self.size, self.max_bytes = size, max_bytes
        super().__init__(
            f"bias set is {size:,} bytes, over the store's limit of {max_bytes:,} bytes; "
            "a bias set for this backbone should be far smaller (check that the file is a bias set)"
        )


class VersionActive(StoreError):
    """Deleting the active version was asked for without `force`."""

    def __init__(self, task: str, version: str):
        self.task, self.version = task, version
        super().__init__(
            f"version {version!r} is the active version of task {task!r}; activate another version first, "
            "or delete it with force (the previously active version then becomes active)"
        )


class NothingToRollBack(StoreError):
    """A rollback of a task that has no previously active version left."""

    def __init__(self, task: str):
        self.task = task
        super().__init__(f"task {task!r} has no previously active version to roll back to; "
                         "activate a version by its id instead")


class StoreConflict(StoreError):
    """Other writers kept committing changes first; nothing of this call was committed. Safe to retry."""


class StoreDamaged(StoreError):
    """The store's own files or objects are damaged (a content hash mismatch, unreadable state, a missing
    object that a state lists). Not the caller's fault: an operator must restore from a backup."""


class StoreUnavailable(StoreError):
    """The store cannot be reached right now (object storage down, refusing the credentials, timing out).

    What was resident stays usable; every store call recovers by itself once the store answers again. A
    mutation that raised this may or may not have been committed: read the task back, or repeat it (storing
    the same bytes again gives the same version)."""


class StoreLocked(StoreUnavailable):
    """Another process held the directory store's lock for longer than the timeout."""


class StoreMisconfigured(StoreError, ValueError):
    """The store cannot be opened as configured: an unsupported location, a missing bucket, credentials the
    endpoint refuses, or an object store without the conditional writes the store's commits rely on."""
