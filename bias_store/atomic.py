"""Crash-safe file replacement: temporary file in the same directory, fsync, rename, fsync the directory.

rename(2) within one file system is atomic, so a reader sees either the old file or the new one; the
fsyncs make the new content durable before the name points at it, and the name durable after. Temporary
files carry the TMP_PREFIX so that a store opening after a crash can tell them from real files.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

TMP_PREFIX = ".tmp-"


def is_temp(name: str) -> bool:
    return name.startswith(TMP_PREFIX)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a directory's entries (renames, new and removed files) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: bytes) -> Path:
    """Replace `path` with `data` so that a crash at any point leaves the old file or the new one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TMP_PREFIX + path.name + ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_rename(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename (both in one file system) and make the change durable in both parent directories."""
    os.replace(src, dst)
    fsync_dir(Path(dst).parent)
    if Path(src).parent != Path(dst).parent:
        fsync_dir(Path(src).parent)
