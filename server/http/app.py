"""The FastAPI app: `create_app(settings, engine=None)` builds the store, the runner and the tasks in its lifespan."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from server import errors
from server.http import openapi
from server.http.auth import TokenRegistry
from server.http.metrics import Metrics
from server.http.fastpath import PredictFastPath
from server.http.middleware import BodyLimit, PredictMetrics
from server.http.routes import audit, fanout, health, openai, predict, tasks, v2
from server.runtime.backend import build_engine
from server.runtime.runner import Runner
from server.generation.service import build_generation
from server.service import TaskService, seed_store
from server.settings import Settings

log = logging.getLogger(__name__)


def open_configured_store(settings: Settings, spec):
    """The store the settings name (a directory or s3://...), checked against the backbone's serving spec."""
    from bias_store import open_store

    return open_store(settings.store, spec, max_bytes=settings.max_upload_bytes)


def runner_options(settings: Settings) -> dict:
    return dict(max_batch=settings.max_batch, max_batch_tokens=settings.max_batch_tokens,
                max_wait_ms=settings.max_wait_ms, max_queued=settings.max_queued,
                group_max_tasks=settings.group_max_tasks, retry_after_s=settings.retry_after_s)


def start_runner(settings: Settings, engine=None):
    """The runner that owns the model: over `engine` in this process when one is given (tests, tools), else as
    the settings say — the engine in its own process (the default), or built here and run on a thread."""
    if engine is None and settings.runner == "process":
        from server.runtime.process import ProcessRunner

        runner = ProcessRunner(settings, **runner_options(settings))
    else:
        runner = Runner(engine if engine is not None else build_engine(settings), **runner_options(settings))
    runner.start()
    return runner


def seed_dirs(settings: Settings) -> list:
    """The shipped seeds for this backbone: its own subfolder where there is one (`seed/smollm2/` for
    `--backbone smollm2`), else the folder's top level (the packaged MiniLM's)."""
    if settings.backbone is not None and (settings.seed_dir / settings.backbone.name).is_dir():
        return [settings.seed_dir / settings.backbone.name]
    return [settings.seed_dir]


def create_app(settings: Settings | None = None, engine=None, store=None, runner=None) -> FastAPI:
    """The app; the runner (over `engine`, if given) and the store are built in the lifespan unless given
    (tests, `bitfit serve`, which builds them first to fail before uvicorn starts).

    A malformed tokens file (BITFIT_TOKENS_FILE) raises `TokenFileError` here, before anything loads."""
    settings = settings or Settings()
    metrics = Metrics()
    tokens = TokenRegistry(settings.tokens_file, settings.token(), reload_s=settings.tokens_reload_s,
                           on_error=lambda message: metrics.tokens_errors.inc())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runner_ = runner or await asyncio.to_thread(start_runner, settings, engine)
        runner_.on_batch = metrics.batch
        store_ = store or await asyncio.to_thread(open_configured_store, settings, runner_.spec)
        if settings.seed:
            for folder in seed_dirs(settings):
                added = await asyncio.to_thread(seed_store, store_, folder)
                if added:
                    log.info("seeded the store at %s with %s", settings.store, added)
        metrics.queue_depth.set_function(lambda: runner_.queued)
        service = TaskService(store_, runner_, settings, metrics)
        await service.start()
        app.state.service = service
        app.state.generation = build_generation(runner_, service, settings)  # None: this backbone does not generate
        if app.state.generation is not None and not getattr(app.state, "openai_routes", False):
            app.include_router(openai.router)  # the /v1 API only where the backbone writes text
            app.state.openai_routes, app.openapi_schema = True, None
        poller = asyncio.create_task(service.poll_forever())
        try:
            yield
        finally:
            service.ready = False
            poller.cancel()
            await asyncio.to_thread(runner_.stop)

    app = FastAPI(
        title="bitfit-serve",
        summary="Many BitFit tasks served from one frozen transformer backbone.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings, app.state.metrics, app.state.tokens = settings, metrics, tokens
    errors.install(app)
    for router in (predict.router, fanout.router, tasks.router, audit.router, v2.router, health.router):
        app.include_router(router)
    openapi.install(app, settings)

    def task_label(task: str | None) -> str:
        service = getattr(app.state, "service", None)
        return service.metric_task(task) if service is not None else "_unknown"

    def body_limit(scope) -> int:
        upload = scope["method"] == "PUT" and scope["path"].startswith("/tasks/")
        return settings.max_upload_bytes if upload else settings.max_body_bytes

    app.add_middleware(PredictFastPath, fastapi_app=app)  # innermost: inside the body limit and the metrics
    app.add_middleware(PredictMetrics, metrics=metrics, task_label=task_label)
    app.add_middleware(BodyLimit, limit_for=body_limit)
    return app
