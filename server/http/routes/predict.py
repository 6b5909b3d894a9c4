"""POST /predict: one task (and optionally one version) per request, a batch of texts or pairs."""

from __future__ import annotations

from fastapi import APIRouter

from server.http.deps import ServiceDep, guarded
from server.http.params import TaskQuery, VersionQuery
from server.http.responses import JSONBytes
from server.http.schemas import PredictRequest, PredictResponse, errors

router = APIRouter(tags=["predict"])


@router.post("/predict", response_model=PredictResponse, **guarded("predict"),
             responses=errors(401, 403, 404, 413, 422, 503))
async def predict(body: PredictRequest, service: ServiceDep, task: TaskQuery,
                  version: VersionQuery = None) -> JSONBytes:
    """Labels and scores (or a value, for a regression task) per input, and the version that answered.

    Inputs longer than the model's maximum are truncated to it, and flagged `truncated: true`.
    """
    return JSONBytes(await service.predict(task, version, body.inputs))
