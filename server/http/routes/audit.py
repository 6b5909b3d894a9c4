"""GET /audit: the admin changes recorded in the store, newest first (always needs a token with scope read)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from bias_store.names import MAX_TASK_LEN
from server.http.deps import ServiceDep, guarded
from server.http.params import TASK_PATTERN
from server.http.responses import JSONBytes
from server.http.schemas import AuditOut, errors

router = APIRouter(tags=["tasks"])
MAX_LIMIT = 1000


@router.get("/audit", response_model=AuditOut, **guarded("audit"), responses=errors(401, 403, 422, 503))
async def audit(
    service: ServiceDep,
    task: Annotated[str | None, Query(description="only this task's changes", pattern=TASK_PATTERN,
                                      max_length=MAX_TASK_LEN)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="at most this many records")] = 100,
) -> JSONBytes:
    """Who uploaded, activated, rolled back or deleted what, when, and from where."""
    return JSONBytes({"records": await service.audit(task, limit)})
