"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from server.deps import ServiceDep
from server.schemas import Health, Ready, errors

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process is alive and answering."""
    return Health()


@router.get("/readyz", response_model=Ready, responses=errors(503))
async def readyz(service: ServiceDep) -> Ready:
    """The backbone is loaded and every active task is resident."""
    return Ready(status="ready", tasks=len(service.active), resident=len(service.labels), bank_bytes=service.bank_bytes)


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus text format."""
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
