"""The FastAPI app: `create_app(settings, engine=None)` builds the store, batcher and tasks in its lifespan."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from server import errors
from server.batcher import Batcher
from server.engine import Engine
from server.metrics import Metrics
from server.middleware import BodyLimit, PredictMetrics
from server.routes import health, predict, tasks
from server.service import TaskService, seed_store
from server.settings import Settings

log = logging.getLogger(__name__)


def build_engine(settings: Settings) -> Engine:
    """Load the backbone once (float32, layout and fingerprint taken), then cast and move it."""
    import torch

    from bitfit.backbone import load_backbone

    if settings.threads:
        torch.set_num_threads(settings.threads)
    backbone = load_backbone(settings.backbone)
    return Engine(backbone, device=settings.device, dtype=settings.dtype, max_batch=settings.max_batch)


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        from bias_store import BiasStore

        eng = engine or await asyncio.to_thread(build_engine, settings)
        store = BiasStore(settings.store, eng.spec, max_bytes=settings.max_upload_bytes)
        if settings.seed:
            added = await asyncio.to_thread(seed_store, store, settings.seed_dir)
            if added:
                log.info("seeded the store at %s with %s", settings.store, added)
        batcher = Batcher(eng, max_batch=settings.max_batch, max_wait_ms=settings.max_wait_ms,
                          max_queued=settings.max_queued, group_max_tasks=settings.group_max_tasks,
                          retry_after_s=settings.retry_after_s, on_batch=metrics.batch)
        metrics.queue_depth.set_function(lambda: batcher.queued)
        batcher.start()
        service = TaskService(store, batcher, settings, metrics)
        await service.start()
        app.state.service = service
        poller = asyncio.create_task(service.poll_forever())
        try:
            yield
        finally:
            service.ready = False
            poller.cancel()
            await asyncio.to_thread(batcher.stop)

    app = FastAPI(
        title="bitfit-serve",
        summary="Many BitFit tasks served from one frozen transformer backbone.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings, app.state.metrics = settings, metrics
    errors.install(app)
    for router in (predict.router, tasks.router, health.router):
        app.include_router(router)

    def task_label(task: str | None) -> str:
        service = getattr(app.state, "service", None)
        return service.metric_task(task) if service is not None else "_unknown"

    def body_limit(scope) -> int:
        upload = scope["method"] == "PUT" and scope["path"].startswith("/tasks/")
        return settings.max_upload_bytes if upload else settings.max_body_bytes

    app.add_middleware(PredictMetrics, metrics=metrics, task_label=task_label)
    app.add_middleware(BodyLimit, limit_for=body_limit)
    return app
