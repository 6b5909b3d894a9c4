"""The OpenAPI document as this server's exact contract (client generators and schemathesis rely on it).

FastAPI's document, finished in three ways: the V2 inference request's models (its route reads the raw body, JSON or
binary), bearer security on exactly the operations whose access rule the settings put in force, and the configured
limits (inputs per request, characters per text), so a request the document allows is one the server takes.
"""

from __future__ import annotations

from fastapi import FastAPI

from server.http.deps import RULES
from server.http.schemas_v2 import InferRequest
from server.settings import Settings

SECURITY = {"bearer": {"type": "http", "scheme": "bearer",
                       "description": "a token of BITFIT_TOKENS_FILE (or BITFIT_ADMIN_TOKEN); the scope each operation "
                                      "needs is its x-scope"}}
SCOPE_DOC = {"admin": "admin:<glob matching the task>", "predict": "predict", "read": "read", "audit": "read"}


def install(app: FastAPI, settings: Settings) -> None:
    default = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            finish(default(), app, settings)  # FastAPI's own, cached on the app; finished once, in place
        return app.openapi_schema

    app.openapi = openapi


def finish(schema: dict, app: FastAPI, settings: Settings) -> dict:
    schemas = schema.setdefault("components", {}).setdefault("schemas", {})
    add_model(schemas, InferRequest)
    secure(schema, settings)
    for name, field in (("PredictRequest", "inputs"), ("InferInput", "data")):
        cap(schemas[name]["properties"][field], settings.max_inputs, settings.max_text_chars)
    for p in schema["paths"]["/fanout"]["post"]["parameters"]:
        if p["name"] == "task":  # tasks x inputs <= max_batch: at most max_batch tasks (for one input)
            p["schema"]["maxItems"] = settings.max_batch
    return schema


def add_model(schemas: dict, model) -> None:
    body = model.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(body.pop("$defs", {}))
    schemas[model.__name__] = body


def secure(schema: dict, settings: Settings) -> None:
    """Bearer security on the operations whose rule (their `x-scope`, set by `deps.guarded`) is in force."""
    used = False
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            rule = operation.get("x-scope")
            if rule is None:
                continue
            operation["x-scope"] = SCOPE_DOC[rule]
            if RULES[rule].active(settings):
                operation["security"] = [{"bearer": []}]
                used = True
    if used:
        schema["components"]["securitySchemes"] = SECURITY


def cap(node, items: int, chars: int, top: bool = True) -> None:
    """Every array of texts in `node` at most `items` long (the outer ones), every string at most `chars`."""
    if isinstance(node, list):
        for x in node:
            cap(x, items, chars, top)
        return
    if not isinstance(node, dict):
        return
    if node.get("type") == "string":
        node["maxLength"] = chars
    if node.get("type") == "array" and top:
        node["maxItems"] = items
        cap(node.get("items"), items, chars, top=False)
        return
    for key in ("anyOf", "items", "prefixItems"):
        if key in node:
            cap(node[key], items, chars, top)
