"""Crash-safe file replacement, shared by bias sets, checkpoints, results files and the bias store.

A temporary file in the target's directory is written, fsynced, then renamed over the target: rename(2)
within one file system is atomic, so a reader (or a process starting after a crash) sees the old file or
the new one, never a mix. `durable=True` also fsyncs the directory, so the new name survives a power cut.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a directory's entries (renames, new and removed files) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, data: bytes, *, prefix: str | None = None, durable: bool = False,
                 mkdir: bool = True) -> Path:
    """Replace `path` with `data` so that a crash at any point leaves the old file or the new one.

    `prefix` names the temporary file (default `.NAME.`, hidden), so a cleaner can recognise leftovers.
    """
    path = Path(path)
    if mkdir:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix or f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644 & ~_umask())  # mkstemp makes 0600; none of these files is a secret
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
