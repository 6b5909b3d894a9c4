"""Route dependencies: the task service, the settings and the access rules (scoped tokens), as annotated aliases."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from server.errors import AdminDisabled, Forbidden, NotReady, Unauthorized
from server.http.auth import Token, TokenRegistry
from server.service import TaskService
from server.settings import Settings


async def get_settings(request: Request) -> Settings:  # async: a sync dependency costs a thread hop per request
    return request.app.state.settings


async def get_service(request: Request) -> TaskService:
    service = getattr(request.app.state, "service", None)
    if service is None or not service.ready:
        raise NotReady("the server is starting (loading the backbone and tasks) or stopping; retry shortly")
    return service


@dataclass(frozen=True)
class Caller:
    """Who made a call, for the audit log."""

    token: str | None  # the token's name; None when the call needed no token
    client: str | None  # the client's address


def needed(scope: str, task: str | None) -> str:
    if scope == "admin":
        return f"'admin:*' or an 'admin:<glob>' matching {task!r}"
    return "'read' (or any admin scope)" if scope == "read" else f"{scope!r}"


def authorize(registry: TokenRegistry, header: str, scope: str, task: str | None, metrics) -> Token:
    """The token in an Authorization header that has `scope` (for `task`); 401 or 403 otherwise."""
    if not registry.configured:
        raise AdminDisabled()
    need = needed(scope, task)
    kind, _, secret = header.partition(" ")
    secret = secret.strip()
    if kind.lower() != "bearer" or not secret:
        metrics.auth_refusals.labels("_none", "401").inc()
        raise Unauthorized(f"this call needs 'Authorization: Bearer <token>' with a token that has scope {need}")
    token = registry.find(secret)
    if token is None:
        metrics.auth_refusals.labels("_unknown", "401").inc()
        raise Unauthorized("unknown token: send 'Authorization: Bearer <token>' with a token of BITFIT_TOKENS_FILE "
                           f"(or BITFIT_ADMIN_TOKEN) that has scope {need}")
    if not token.allows(scope, task):
        metrics.auth_refusals.labels(token.name, "403").inc()
        raise Forbidden(f"token {token.name!r} may not do this: it needs scope {need}, "
                        f"and has {', '.join(sorted(token.scopes))}")
    metrics.token_requests.labels(token.name, scope).inc()
    return token


class Needs:
    """A route's access rule: the scope it needs (predict, read or admin) and when the settings ask for it.

    Admin always needs a token; predict when BITFIT_PREDICT_AUTH is on; read when reads need a token, or
    `always` (the audit log). The OpenAPI document marks exactly the operations whose rule is in force."""

    def __init__(self, scope: str, *, always: bool = False):
        self.scope, self.always = scope, always

    def active(self, settings: Settings) -> bool:
        if self.scope == "admin" or self.always:
            return True
        return settings.predict_auth if self.scope == "predict" else settings.reads_need_token

    async def __call__(self, request: Request) -> Caller:
        state = request.app.state
        client = request.client.host if request.client else None
        if not self.active(state.settings):
            return Caller(None, client)
        task = request.path_params.get("task") if self.scope == "admin" else None
        token = authorize(state.tokens, request.headers.get("authorization", ""), self.scope, task, state.metrics)
        return Caller(token.name, client)


# The rules, by the name each route's OpenAPI operation carries as `x-scope` (server/http/openapi.py reads it).
RULES = {"admin": Needs("admin"), "predict": Needs("predict"), "read": Needs("read"),
         "audit": Needs("read", always=True)}


def guarded(rule: str, openapi_extra: dict | None = None) -> dict:
    """A route's keyword arguments for an access rule: the check, and its mark in the OpenAPI document."""
    return {"dependencies": [Depends(RULES[rule])], "openapi_extra": (openapi_extra or {}) | {"x-scope": rule}}


ServiceDep = Annotated[TaskService, Depends(get_service)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
AdminCaller = Annotated[Caller, Depends(RULES["admin"])]  # the same callable as guarded("admin"): checked once
