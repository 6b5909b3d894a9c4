"""POST /predict without FastAPI's per-request machinery: the same checks, the same answers, less CPU per request.

On a small CPU, FastAPI's routing, dependency solving and parameter validation cost about 2 ms per request, as
much as the rest of HTTP together and 8 % of a MiniLM input's forward pass (docs/engine.md, "HTTP"). This plain
ASGI layer in front of FastAPI answers the common case of the hottest route itself: a `POST /predict` whose only
query parameters are one valid `task` and at most one valid `version`, with a JSON body that `PredictRequest`
accepts. It runs the route's own steps — the readiness check, the access rule (`deps.RULES["predict"]`), the
service call, the one error handler — and answers what the route would. Anything else (another path, an odd
query, a body the model refuses) goes to FastAPI untouched, the body replayed, so every unusual answer is
FastAPI's own. The route stays the documented contract (`/openapi.json`); `tests/test_fastpath.py` checks that
both paths answer a table of requests identically. `BITFIT_FAST_PREDICT=false` turns this layer off.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl

from pydantic import ValidationError

from server.errors import NotReady, error_response
from server.http.params import TASK_PATTERN, VERSION_PATTERN
from server.http.responses import JSONBytes
from server.http.schemas import PredictRequest

TASK = re.compile(TASK_PATTERN)
VERSION = re.compile(VERSION_PATTERN)


def simple_query(query_string: bytes) -> tuple[str, str | None] | None:
    """(task, version) when the query is exactly `task=T[&version=V]`, both valid; else None (FastAPI decides)."""
    try:
        pairs = parse_qsl(query_string.decode("ascii"), keep_blank_values=True, strict_parsing=True)
    except (UnicodeDecodeError, ValueError):
        return None
    names = [k for k, _ in pairs]
    if names not in (["task"], ["task", "version"], ["version", "task"]):
        return None
    values = dict(pairs)
    task, version = values["task"], values.get("version")
    if not TASK.match(task) or (version is not None and not VERSION.match(version)):
        return None
    return task, version


def is_json(headers: list[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name == b"content-type":
            return value.split(b";", 1)[0].strip().lower() == b"application/json"
    return False


class PredictFastPath:
    def __init__(self, app, fastapi_app):
        self.app, self.state = app, fastapi_app.state

    async def __call__(self, scope, receive, send):
        if (scope["type"] != "http" or scope["path"] != "/predict" or scope["method"] != "POST"
                or not self.state.settings.fast_predict):
            return await self.app(scope, receive, send)
        params = simple_query(scope.get("query_string", b""))
        if params is None or not is_json(scope["headers"]):
            return await self.app(scope, receive, send)
        chunks = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            request = PredictRequest.model_validate_json(body)
        except ValidationError:
            return await self.app(scope, replay(body, receive), send)
        try:
            response = JSONBytes(await self.predict(scope, params, request))
        except Exception as e:  # the one handler, as FastAPI would call it
            response = error_response(e, "/predict")
        await response(scope, receive, send)

    async def predict(self, scope, params: tuple[str, str | None], request: PredictRequest) -> dict:
        from server.http.deps import RULES, authorize

        service = getattr(self.state, "service", None)
        if service is None or not service.ready:
            raise NotReady("the server is starting (loading the backbone and tasks) or stopping; retry shortly")
        rule = RULES["predict"]
        if rule.active(self.state.settings):
            header = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), "")
            authorize(self.state.tokens, header, "predict", None, self.state.metrics)
        task, version = params
        return await service.predict(task, version, request.inputs)


def replay(body: bytes, receive):
    """A `receive` that hands over `body` once, then whatever the connection says next (a disconnect)."""
    sent = False

    async def again():
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return again
