"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from server.http.deps import ServiceDep
from server.http.schemas import Health, Ready, errors

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process is alive and answering."""
    return Health()


@router.get("/readyz", response_model=Ready, responses=errors(503))
async def readyz(service: ServiceDep) -> Ready:
    """The backbone is loaded and every active task is resident.

    `degraded` (still 200): the store does not answer; the resident tasks are served, changes wait (503)."""
    runner = service.runner
    return Ready(status="degraded" if service.store_error else "ready", tasks=len(service.active),
                 resident=len(runner.resident()), bank_bytes=runner.bank_bytes,
                 store="ok" if service.store_error is None else f"unavailable: {service.store_error}")


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus text format."""
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
