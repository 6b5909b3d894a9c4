"""POST /predict: one task (and optionally one version) per request, a batch of texts or pairs."""

from __future__ import annotations

from fastapi import APIRouter, Query

from server.deps import ServiceDep
from server.schemas import PredictRequest, PredictResponse, errors

router = APIRouter(tags=["predict"])


@router.post("/predict", response_model=PredictResponse, responses=errors(404, 413, 422, 503))
async def predict(
    body: PredictRequest,
    service: ServiceDep,
    task: str = Query(description="task name, as listed by GET /tasks", examples=["sst2"]),
    version: str | None = Query(None, description="a stored version of the task; default: its active version"),
) -> PredictResponse:
    """Labels and scores (or a value, for a regression task) per input, and the version that answered.

    Inputs longer than the model's maximum are truncated to it, and flagged `truncated: true`.
    """
    return await service.predict(task, version, body.inputs)
