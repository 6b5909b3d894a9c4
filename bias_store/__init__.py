"""Validation of bias sets against a backbone, and the versioned, crash-safe store that keeps them: a local
directory (`BiasStore`) or S3-compatible object storage (`S3Store`), both opened by `open_store(location)`.

Depends on `bitfit` only; nothing here knows about HTTP. S3 support needs boto3 (the `s3` extra), imported
only when an s3:// store is opened.
"""

from bias_store.base import Store
from bias_store.errors import (
    InvalidBiasSet,
    InvalidTaskName,
    NothingToRollBack,
    PayloadTooLarge,
    StoreConflict,
    StoreDamaged,
    StoreError,
    StoreLocked,
    StoreMisconfigured,
    StoreUnavailable,
    TaskNotFound,
    VersionActive,
    VersionNotFound,
)
from bias_store.names import check_task_name, task_name_problem
from bias_store.store import BiasStore, TaskInfo, VersionInfo, open_store, parse_location
from bias_store.validate import validate

__all__ = [
    "BiasStore",
    "InvalidBiasSet",
    "InvalidTaskName",
    "NothingToRollBack",
    "PayloadTooLarge",
    "Store",
    "StoreConflict",
    "StoreDamaged",
    "StoreError",
    "StoreLocked",
    "StoreMisconfigured",
    "StoreUnavailable",
    "TaskInfo",
    "TaskNotFound",
    "VersionActive",
    "VersionInfo",
    "VersionNotFound",
    "check_task_name",
    "open_store",
    "parse_location",
    "task_name_problem",
    "validate",
]
