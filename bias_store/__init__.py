"""Validation of bias sets against a backbone, and the versioned, crash-safe store that keeps them.

Depends on `bitfit` only; nothing here knows about HTTP.
"""

from bias_store.errors import (
    InvalidBiasSet,
    InvalidTaskName,
    PayloadTooLarge,
    StoreError,
    StoreLocked,
    TaskNotFound,
    VersionActive,
    VersionNotFound,
)
from bias_store.names import check_task_name, task_name_problem
from bias_store.store import BiasStore, TaskInfo, VersionInfo
from bias_store.validate import validate

__all__ = [
    "BiasStore",
    "InvalidBiasSet",
    "InvalidTaskName",
    "PayloadTooLarge",
    "StoreError",
    "StoreLocked",
    "TaskInfo",
    "TaskNotFound",
    "VersionActive",
    "VersionInfo",
    "VersionNotFound",
    "check_task_name",
    "task_name_problem",
    "validate",
]
