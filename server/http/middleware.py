"""Two small ASGI middlewares: the request body limit (413) and the /predict (and V2 inference) request metrics."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from urllib.parse import parse_qs

from server.errors import RequestTooLarge, error_response

V2_INFER = re.compile(r"/v2/models/([^/]+)(?:/versions/[^/]+)?/infer")


class BodyLimit:
    """Refuse bodies over `limit_for(scope)` bytes before any route reads them.

    A declared Content-Length is checked up front; a chunked body is read here, counted, and replayed.
    """

    def __init__(self, app, limit_for: Callable[[dict], int]):
        self.app, self.limit_for = app, limit_for

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        limit = self.limit_for(scope)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if declared.isdigit() and int(declared) > limit:
                return await error_response(RequestTooLarge(int(declared), limit), scope["path"])(scope, receive, send)
            return await self.app(scope, receive, send)  # the HTTP server holds the body to its declared length
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            total += len(message.get("body", b""))
            if total > limit:
                return await error_response(RequestTooLarge(None, limit), scope["path"])(scope, receive, send)
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


class PredictMetrics:
    """Count, time and classify every /predict and V2 inference answer, errors included, per task."""

    def __init__(self, app, metrics, task_label: Callable[[str | None], str]):
        self.app, self.metrics, self.task_label = app, metrics, task_label

    async def __call__(self, scope, receive, send):
        v2 = V2_INFER.fullmatch(scope["path"]) if scope["type"] == "http" else None
        if scope["type"] != "http" or (scope["path"] != "/predict" and v2 is None):
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def send_and_note(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            task = v2.group(1) if v2 else query.get("task", [None])[0]
            self.metrics.request(self.task_label(task), status, time.perf_counter() - start)
