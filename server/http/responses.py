"""A JSON response serialised once, without re-validating a response model (the route's `response_model`
still documents the contract, and the tests check answers against it)."""

from __future__ import annotations

import json

from starlette.responses import Response


class JSONBytes(Response):
    media_type = "application/json"

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
