"""POST /fanout: the same inputs to many tasks at once, every row in one batch (one gather forward)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from bias_store.names import MAX_TASK_LEN
from server.http.deps import ServiceDep, guarded
from server.http.params import TASK_PATTERN
from server.http.responses import JSONBytes
from server.http.schemas import FanoutResponse, PredictRequest, errors

router = APIRouter(tags=["predict"])
Tasks = Annotated[list[Annotated[str, Query(pattern=TASK_PATTERN, max_length=MAX_TASK_LEN)]], Query(
    alias="task", min_length=1, description="the tasks to ask, repeated: ?task=a&task=b (answered in this order)",
    examples=[["sst2", "cola"]])]


@router.post("/fanout", response_model=FanoutResponse, **guarded("predict"),
             responses=errors(401, 403, 404, 413, 422, 503))
async def fanout(body: PredictRequest, service: ServiceDep, tasks: Tasks) -> JSONBytes:
    """Each input asked of every task, in one forward pass: answers equal each task asked alone.

    Every task answers with its active version. Tasks x inputs must fit the batch limit (BITFIT_MAX_BATCH), and
    the tasks must take the same kind of input (single texts or pairs); 404 names every unknown task."""
    return JSONBytes(await service.fanout(tasks, body.inputs))
