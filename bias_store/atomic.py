"""Crash-safe file replacement: temporary file in the same directory, fsync, rename, fsync the directory.

rename(2) within one file system is atomic, so a reader sees either the old file or the new one; the
fsyncs make the new content durable before the name points at it, and the name durable after. Temporary
files carry the TMP_PREFIX so that a store opening after a crash can tell them from real files.
"""

from __future__ import annotations

import os
from pathlib import Path

from bitfit.files import fsync_dir, write_atomic

__all__ = ["TMP_PREFIX", "atomic_rename", "atomic_write", "fsync_dir", "is_temp"]

TMP_PREFIX = ".tmp-"


def is_temp(name: str) -> bool:
    return name.startswith(TMP_PREFIX)


def atomic_write(path: str | os.PathLike, data: bytes) -> Path:
    """Replace `path` with `data` durably; the temporary file carries TMP_PREFIX (see `is_temp`)."""
    return write_atomic(path, data, prefix=TMP_PREFIX + Path(path).name + ".", durable=True, mkdir=False)


def atomic_rename(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename (both in one file system) and make the change durable in both parent directories."""
    os.replace(src, dst)
    fsync_dir(Path(dst).parent)
    if Path(src).parent != Path(dst).parent:
        fsync_dir(Path(src).parent)
