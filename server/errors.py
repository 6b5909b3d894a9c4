"""The server's typed errors, and the one table that turns any typed error into an HTTP status.

Routes raise; they never catch. `install(app)` registers one handler for every type in `STATUS`, which
answers `{"detail": "..."}` with the status of the nearest class in the exception's MRO.
"""

from __future__ import annotations

import logging

from bias_store.errors import (
    InvalidBiasSet,
    InvalidTaskName,
    PayloadTooLarge,
    StoreError,
    StoreLocked,
    TaskNotFound,
    VersionActive,
    VersionNotFound,
)
from bitfit.errors import BackboneMismatch, BiasSetFormatError

log = logging.getLogger(__name__)


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
    """An admin call without the right bearer token."""


class AdminDisabled(ServerError):
    """An admin call while no admin token is configured."""

    def __init__(self):
        super().__init__("the admin API is disabled because no admin token is configured; start the server "
                         "with BITFIT_ADMIN_TOKEN=<secret> (or `bitfit serve --token`), then send "
                         "'Authorization: Bearer <secret>'")


class VersionGone(ServerError):
    """A task version was removed from the bank while a request for it waited."""

    def __init__(self, key):
        task, version = key if isinstance(key, tuple) and len(key) == 2 else (key, "?")
        super().__init__(f"version {version!r} of task {task!r} was removed while the request waited; "
                         "retry to get the active version")


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
    StoreLocked: 503,
    StoreError: 409,
    Unauthorized: 401,
    AdminDisabled: 403,
    Overloaded: 503,
    NotReady: 503,
}


def status_of(exc: BaseException) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def detail_of(exc: BaseException) -> str:
    if _is_validation_error(exc):
        return validation_detail(exc)
    message = str(exc) or type(exc).__name__
    if isinstance(exc, TaskNotFound):
        message += "; GET /tasks lists the tasks this server has"
    return message


def headers_of(exc: BaseException) -> dict[str, str]:
    if isinstance(exc, Overloaded):
        return {"Retry-After": str(exc.retry_after)}
    if isinstance(exc, (NotReady, StoreLocked)):
        return {"Retry-After": "1"}
    if isinstance(exc, Unauthorized):
        return {"WWW-Authenticate": "Bearer"}
    return {}


def validation_detail(exc) -> str:
    """FastAPI's list of validation errors as one sentence per problem, all of them."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else err.get("msg", "invalid"))
    return "invalid request: " + "; ".join(parts)


def _is_validation_error(exc) -> bool:
    from fastapi.exceptions import RequestValidationError

    return isinstance(exc, RequestValidationError)


def error_response(exc: BaseException):
    from fastapi.responses import JSONResponse

    status = 422 if _is_validation_error(exc) else status_of(exc)
    if status == 500:
        log.error("unhandled error", exc_info=exc)
        return JSONResponse({"detail": f"internal error ({type(exc).__name__}); see the server log"}, status_code=500)
    return JSONResponse({"detail": detail_of(exc)}, status_code=status, headers=headers_of(exc))


async def handle(request, exc: Exception):
    return error_response(exc)


def install(app) -> None:
    """Register the one handler for every typed error, FastAPI's validation errors and anything unexpected."""
    from fastapi.exceptions import RequestValidationError

    for cls in (*STATUS, RequestValidationError, Exception):
        app.add_exception_handler(cls, handle)
