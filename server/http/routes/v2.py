"""The Open Inference Protocol (V2): server and model metadata, health, readiness and inference, per task.

Inference goes through the same service call as /predict (same checks, same batcher: a V2 request and a /predict
request can share a forward), and its answer is serialised once, without response-model revalidation.
Errors are the protocol's `{"error": "..."}` with /predict's status codes (server/errors.py chooses by path).
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from server.errors import InvalidInput
from server.http.deps import ServiceDep, guarded
from server.http.params import TaskPath, VersionPath
from server.http.schemas_v2 import (
    BYTES,
    FP32,
    InferResponse,
    ModelMetadata,
    ModelReady,
    ServerLive,
    ServerMetadata,
    ServerReady,
    TensorMetadata,
    v2_errors,
)
from server.http.v2_codec import HEADER_LENGTH, decode_request, decompress, encode_response, output_problem
from server.service import TaskService

router = APIRouter(prefix="/v2", tags=["v2 (Open Inference Protocol)"])
MODEL_ERRORS = v2_errors(401, 403, 404, 422, 503)
INFER_ERRORS = v2_errors(401, 403, 404, 413, 422, 503)
INFER_BODY = {
    "requestBody": {
        "required": True,
        "description": "the inference request as JSON, or (binary tensor data extension) that JSON followed by the "
                       f"tensors' bytes, with its length in the {HEADER_LENGTH} header",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/InferRequest"}},
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}
INFER_OK = {200: {"description": "the outputs; with binary outputs, the JSON header then the tensors' bytes",
                  "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}


@router.get("", response_model=ServerMetadata)
async def server_metadata(request: Request) -> ServerMetadata:
    return ServerMetadata(name="bitfit-serve", version=request.app.version, extensions=["binary_tensor_data"])


@router.get("/health/live", response_model=ServerLive)
async def live() -> ServerLive:
    return ServerLive(live=True)


@router.get("/health/ready", response_model=ServerReady, responses=v2_errors(503))
async def ready(service: ServiceDep) -> ServerReady:
    """Every active task is resident (503 while starting or stopping)."""
    return ServerReady(ready=True)


async def metadata(service: TaskService, task: str, version: str | None) -> ModelMetadata:
    stored = await service.task(task)
    key = await service.resolve(task, version)
    info = service.runner.info(key)
    kind = info.input_kind
    inputs = [TensorMetadata(name="text", datatype=BYTES, shape=[-1])]
    if kind != "text":
        inputs.append(TensorMetadata(name="text_pair", datatype=BYTES, shape=[-1], optional=kind is None))
    labels = list(info.labels)
    outputs = ([TensorMetadata(name="label", datatype=BYTES, shape=[-1]),
                TensorMetadata(name="scores", datatype=FP32, shape=[-1, len(labels)])] if labels
               else [TensorMetadata(name="value", datatype=FP32, shape=[-1])])
    return ModelMetadata(name=task, versions=[v.version for v in stored.versions], platform="bitfit",
                         inputs=inputs, outputs=outputs,
                         parameters={"labels": labels, "version": key[1], "active_version": stored.active,
                                     "input_kind": kind})


@router.get("/models/{task}", response_model=ModelMetadata, **guarded("read"), responses=MODEL_ERRORS)
async def model_metadata(task: TaskPath, service: ServiceDep) -> ModelMetadata:
    """Inputs, outputs, labels in the order of `scores`, and versions, of the task's active version."""
    return await metadata(service, task, None)


@router.get("/models/{task}/versions/{version}", response_model=ModelMetadata, **guarded("read"),
            responses=MODEL_ERRORS)
async def model_version_metadata(task: TaskPath, version: VersionPath, service: ServiceDep) -> ModelMetadata:
    return await metadata(service, task, version)


@router.get("/models/{task}/ready", response_model=ModelReady, **guarded("read"), responses=MODEL_ERRORS)
async def model_ready(task: TaskPath, service: ServiceDep) -> ModelReady:
    """200 when the task answers (its active version is resident); 404 when there is no such task."""
    key = await service.resolve(task, None)
    return ModelReady(name=task, version=key[1], ready=True)


@router.get("/models/{task}/versions/{version}/ready", response_model=ModelReady, **guarded("read"),
            responses=MODEL_ERRORS)
async def model_version_ready(task: TaskPath, version: VersionPath, service: ServiceDep) -> ModelReady:
    key = await service.resolve(task, version)  # a stored version is made resident, as a request for it would
    return ModelReady(name=task, version=key[1], ready=True)


async def infer(request: Request, service: TaskService, task: str, version: str | None) -> Response:
    limit = request.app.state.settings.max_body_bytes
    body = decompress(await request.body(), request.headers.get("content-encoding"), limit)
    infer_request, tensors = decode_request(body, request.headers.get(HEADER_LENGTH))
    key = await service.resolve(task, version)
    info = service.runner.info(key)
    if problem := inputs_problem(task, info.input_kind if info else None, tensors) or output_problem(
            infer_request, task, info.labels if info else ()):
        raise InvalidInput(problem)
    texts, pairs = tensors["text"], tensors.get("text_pair")
    inputs = texts if pairs is None else [[a, b] for a, b in zip(texts, pairs)]
    answer = await service.predict(task, key[1], inputs)
    content, headers, media_type = encode_response(infer_request, task, answer)
    return Response(content, headers=headers, media_type=media_type)


def inputs_problem(task: str, kind: str | None, tensors: dict[str, list[str]]) -> str | None:
    """Why these inputs do not fit the task, in the protocol's words, or None."""
    wants = ("text", "text_pair") if kind == "pair" else ("text",) if kind == "text" else None
    given = tuple(name for name in ("text", "text_pair") if name in tensors)
    if "text" not in tensors:
        takes = " and ".join(wants or ("text", "text_pair (optional)"))
        return f"input 'text' is missing; model {task!r} takes {takes}"
    if wants is not None and given != wants:
        return f"model {task!r} takes inputs {' and '.join(wants)}; this request sent {' and '.join(given)}"
    if "text_pair" in tensors and len(tensors["text_pair"]) != len(tensors["text"]):
        return f"inputs 'text' and 'text_pair' must have the same shape: {len(tensors['text'])} and " \
               f"{len(tensors['text_pair'])} elements"
    return None


@router.post("/models/{task}/infer", response_model=InferResponse, responses=INFER_ERRORS | INFER_OK,
             **guarded("predict", INFER_BODY))
async def model_infer(task: TaskPath, request: Request, service: ServiceDep) -> Response:
    """Inference with the task's active version; `model_version` says which answered."""
    return await infer(request, service, task, None)


@router.post("/models/{task}/versions/{version}/infer", response_model=InferResponse, responses=INFER_ERRORS | INFER_OK,
             **guarded("predict", INFER_BODY))
async def model_version_infer(task: TaskPath, version: VersionPath, request: Request, service: ServiceDep) -> Response:
    return await infer(request, service, task, version)

