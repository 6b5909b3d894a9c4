"""Task names: they become directory names, so only a strict ASCII pattern is accepted."""

from __future__ import annotations

import re
import unicodedata

from bias_store.errors import InvalidTaskName

MAX_TASK_LEN = 64
TASK_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}", re.ASCII)
RULE = "use 1-64 characters from lower-case ASCII letters, digits, '-' and '_', starting with a letter or digit"


def task_name_problem(name: object) -> str | None:
    """Why `name` is not a valid task name, or None when it is."""
    if not isinstance(name, str):
        return f"task name must be a string, got {type(name).__name__}"
    if name == "":
        return f"task name is empty; {RULE}"
    if len(name) > MAX_TASK_LEN:
        return f"task name is {len(name)} characters long, the limit is {MAX_TASK_LEN}; {RULE}"
    if "/" in name or "\\" in name or "\x00" in name:
        return f"task name {name!r} contains a path separator; {RULE}"
    if name in (".", "..") or name.startswith("."):
        return f"task name {name!r} starts with '.'; {RULE}"
    if not name.isascii():
        bad = next(c for c in name if not c.isascii())
        what = unicodedata.name(bad, "unnamed character")
        return f"task name {name!r} contains the non-ASCII character {bad!r} (U+{ord(bad):04X} {what}); {RULE}"
    if name != name.lower():
        return f"task name {name!r} contains upper-case letters (try {name.lower()!r}); {RULE}"
    if not TASK_RE.fullmatch(name):
        return f"task name {name!r} is invalid; {RULE}"
    return None


def check_task_name(name: object) -> str:
    problem = task_name_problem(name)
    if problem:
        raise InvalidTaskName(problem)
    return name  # type: ignore[return-value]
