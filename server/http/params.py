"""Path and query parameters shared by the routes, with the store's own rules in the schema (OpenAPI): a request
the document allows is one the server takes, and client generators see the patterns."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path, Query

from bias_store.names import MAX_TASK_LEN, TASK_RE

TASK_PATTERN = f"^{TASK_RE.pattern}$"
VERSION_PATTERN = "^[0-9a-f]{16}$"  # 16 hex digits of the content's sha256 (bias_store.state.version_id)
TASK_DOC = "task name, as listed by GET /tasks"
VERSION_DOC = "a stored version of the task (16 hex digits)"

TaskPath = Annotated[str, Path(description=TASK_DOC, pattern=TASK_PATTERN, max_length=MAX_TASK_LEN, examples=["sst2"])]
VersionPath = Annotated[str, Path(description=VERSION_DOC, pattern=VERSION_PATTERN)]
TaskQuery = Annotated[str, Query(description=TASK_DOC, pattern=TASK_PATTERN, max_length=MAX_TASK_LEN,
                                  examples=["sst2"])]
VersionQuery = Annotated[str | None, Query(description=f"{VERSION_DOC}; default: its active version",
                                           pattern=VERSION_PATTERN)]
