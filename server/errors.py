"""The server's typed errors, and the one table that turns any typed error into an HTTP status.

Routes raise; they never catch. `install(app)` registers one handler for every type in `STATUS`, which
answers `{"detail": "..."}` with the status of the nearest class in the exception's MRO; under `/v2` (the Open
Inference Protocol) the same message and status come as `{"error": "..."}`, the protocol's error body.
"""

from __future__ import annotations

import logging
import re

from bias_store.errors import (
    InvalidBiasSet,
    InvalidTaskName,
    NothingToRollBack,
    PayloadTooLarge,
    StoreConflict,
    StoreDamaged,
    StoreError,
    StoreUnavailable,
    TaskNotFound,
    VersionActive,
    VersionNotFound,
)
from bias_store.names import task_name_problem
from bitfit.errors import BackboneMismatch, BiasSetFormatError

log = logging.getLogger(__name__)
HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}


class ServerError(Exception):
    """Base of the errors the server raises on purpose."""


class InvalidInput(ServerError, ValueError):
    """A request the schema accepts but the limits refuse (too many inputs, a text too long, ...)."""


class RequestTooLarge(ServerError):
    """The request body is over the configured limit."""

    def __init__(self, size: int | None, limit: int):
        self.size, self.limit = size, limit
        got = f"{size:,} bytes" if size is not None else "more"
        super().__init__(f"request body is {got}, over the limit of {limit:,} bytes "
                         "(BITFIT_MAX_BODY_BYTES for /predict, BITFIT_MAX_UPLOAD_BYTES for uploads)")


class Overloaded(ServerError):
    """The queue is full: retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int = 1):
        self.retry_after = retry_after
        super().__init__(message)


class NotReady(ServerError):
    """The backbone or the tasks are not loaded yet (or the server is shutting down)."""


class Unauthorized(ServerError):
    """A call that needs a token, without one or with an unknown one."""


class Forbidden(ServerError):
    """A known token outside the scope the call needs (the message names that scope)."""


class AdminDisabled(ServerError):
    """An admin call while no admin token is configured."""

    def __init__(self):
        super().__init__("the admin API is disabled because no admin token is configured; start the server "
                         "with BITFIT_ADMIN_TOKEN=<secret> (or `bitfit serve --token`) or with scoped tokens in "
                         "BITFIT_TOKENS_FILE (docs/platform.md), then send 'Authorization: Bearer <secret>'")


class UnknownTasks(TaskNotFound):
    """Tasks a fan-out names that the store does not have (all of them, in one message)."""

    def __init__(self, tasks: list[str]):
        self.task, self.tasks = tasks[0], tasks
        StoreError.__init__(self, f"task{'s' if len(tasks) > 1 else ''} {', '.join(map(repr, tasks))} "
                            f"{'are' if len(tasks) > 1 else 'is'} not in the store")


class VersionGone(ServerError):
    """A task version was removed from the bank while a request for it waited."""

    def __init__(self, key):
        self.key = key
        task, version = key if isinstance(key, tuple) and len(key) == 2 else (key, "?")
        super().__init__(f"version {version!r} of task {task!r} was removed while the request waited; "
                         "retry to get the active version")

    def __reduce__(self):  # crosses from the engine process as itself
        return VersionGone, (self.key,)


# The only type -> status table. Order does not matter: the nearest class in an exception's MRO wins.
STATUS: dict[type[Exception], int] = {
    TaskNotFound: 404,
    VersionNotFound: 404,
    VersionGone: 404,
    InvalidTaskName: 422,
    InvalidBiasSet: 422,
    BiasSetFormatError: 422,
    BackboneMismatch: 422,
    InvalidInput: 422,
    PayloadTooLarge: 413,
    RequestTooLarge: 413,
    VersionActive: 409,
    NothingToRollBack: 409,
    StoreConflict: 409,
    StoreUnavailable: 503,  # S3 down or the directory's lock held too long: predictions go on, changes wait
    StoreDamaged: 500,  # the server's fault, not the caller's: logged with the cause
    StoreError: 409,
    Unauthorized: 401,
    Forbidden: 403,
    AdminDisabled: 403,
    Overloaded: 503,
    NotReady: 503,
}


def status_of(exc: BaseException) -> int:
    if _is_http_exception(exc):  # Starlette's own: 404 for an unknown path, 405 for a method the path lacks
        return 422 if exc.status_code == 400 else exc.status_code  # 400: a body FastAPI cannot decode, invalid as any
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def detail_of(exc: BaseException) -> str:
    if _is_validation_error(exc):
        return validation_detail(exc)
    if _is_http_exception(exc):
        if exc.status_code == 400:
            return f"invalid request: {exc.detail} (send UTF-8 JSON, with Content-Type: application/json)"
        return str(exc.detail)
    message = str(exc) or type(exc).__name__
    if isinstance(exc, TaskNotFound):
        message += "; GET /tasks lists the tasks this server has"
    return message


def headers_of(exc: BaseException, request=None) -> dict[str, str]:
    if _is_http_exception(exc):
        allowed = allowed_methods(request) if exc.status_code == 405 and request is not None else None
        return {"Allow": ", ".join(allowed)} if allowed else dict(exc.headers or {})
    if isinstance(exc, Overloaded):
        return {"Retry-After": str(exc.retry_after)}
    if isinstance(exc, (NotReady, StoreUnavailable)):
        return {"Retry-After": "1"}
    if isinstance(exc, Unauthorized):
        return {"WWW-Authenticate": "Bearer"}
    return {}


def validation_detail(exc) -> str:
    """FastAPI's list of validation errors as one sentence per problem, all of them."""
    parts = []
    for err in exc.errors():
        loc = err.get("loc", ())
        where = ".".join(str(x) for x in loc if x != "body")
        msg = err.get("msg", "invalid")
        if "task" in loc[-2:] and err.get("type") in ("string_pattern_mismatch", "string_too_long"):  # task=a&task=b
            msg = task_name_problem(err.get("input")) or msg  # the store's rule, in words, not the regex
        parts.append(f"{where}: {msg}" if where else msg)
    return "invalid request: " + "; ".join(parts)


def allowed_methods(request) -> list[str] | None:
    """The methods the OpenAPI document gives this path (Starlette's 405 names only the first route's)."""
    methods = set()
    for template, operations in request.app.openapi().get("paths", {}).items():
        parts = re.split(r"(\{[^}]+\})", template)  # "/tasks/{task}" -> "/tasks/", "{task}", ""
        pattern = "".join("[^/]+" if part.startswith("{") else re.escape(part) for part in parts)
        if re.fullmatch(pattern, request.url.path):
            methods |= {m.upper() for m in operations if m in HTTP_METHODS}
    return sorted(methods) or None


def _is_http_exception(exc) -> bool:
    from starlette.exceptions import HTTPException

    return isinstance(exc, HTTPException)


def _is_validation_error(exc) -> bool:
    from fastapi.exceptions import RequestValidationError

    return isinstance(exc, RequestValidationError)


def body_key(path: str) -> str:
    """The error body's one key: the Open Inference Protocol's `error` under /v2, `detail` elsewhere."""
    return "error" if path == "/v2" or path.startswith("/v2/") else "detail"


def error_response(exc: BaseException, path: str = "", request=None):
    from fastapi.responses import JSONResponse

    key = body_key(path)
    status = 422 if _is_validation_error(exc) else status_of(exc)
    if isinstance(exc, StoreDamaged):
        log.error("the store is damaged: %s", exc)
        return JSONResponse({key: f"the store is damaged: {exc}; see the server log"}, status_code=500)
    if status == 500:
        log.error("unhandled error", exc_info=exc)
        return JSONResponse({key: f"internal error ({type(exc).__name__}); see the server log"}, status_code=500)
    return JSONResponse({key: detail_of(exc)}, status_code=status, headers=headers_of(exc, request))


async def handle(request, exc: Exception):
    return error_response(exc, request.url.path, request)


def install(app) -> None:
    """Register the one handler for every typed error, FastAPI's validation errors and anything unexpected."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    for cls in (*STATUS, RequestValidationError, HTTPException, Exception):
        app.add_exception_handler(cls, handle)
