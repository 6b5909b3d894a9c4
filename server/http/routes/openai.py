"""OpenAI-compatible generation: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions`.

`model=<task>` asks a generation task's active version, `model=<task>@<version>` pins one. Every request runs
through the continuous-batching scheduler (`server/generation/scheduler.py`), so the sequences of every task share
each decode step. Errors come in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, mapped once
here (`OpenAIRoute`): 400 for a request the limits refuse (or a classification task: ask `/predict`), 404 for an
unknown model, 401/403/503 as elsewhere. A client that goes away (stream or not) frees its slot at the next step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute

from server import errors
from server.errors import NotReady
from server.generation.service import GenerationService, LimitExceeded, ModelNotFound, NotGenerationTask, Started
from server.generation.stops import TextStream
from server.http.deps import guarded
from server.http.schemas_openai import (ChatRequest, ChatResponse, CompletionRequest, CompletionResponse,
                                        ErrorResponse, ModelCard, ModelList)

log = logging.getLogger(__name__)
COMPLETION_DEFAULT_TOKENS = 16  # OpenAI's default for /v1/completions
DISCONNECT_POLL_S = 0.1
TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 401: "authentication_error",
         403: "permission_error", 413: "invalid_request_error", 429: "rate_limit_error"}


# -- errors, in OpenAI's shape ------------------------------------------------------------------------------


def openai_error(exc: BaseException) -> JSONResponse:
    param = code = None
    if isinstance(exc, RequestValidationError):
        status, message = 400, errors.validation_detail(exc)
        locs = [e.get("loc", ()) for e in exc.errors()]
        param = next((str(loc[1]) for loc in locs if len(loc) > 1 and loc[0] == "body"), None)
    else:
        status = 400 if isinstance(exc, errors.InvalidInput) else errors.status_of(exc)
        message = str(exc) or type(exc).__name__
        if isinstance(exc, ModelNotFound):
            param, code = "model", "model_not_found"
        elif isinstance(exc, NotGenerationTask):
            param, code = "model", "not_a_generation_model"
        elif isinstance(exc, LimitExceeded):
            param = exc.param
        if status == 500:
            log.error("unhandled error", exc_info=exc)
            message = f"internal error ({type(exc).__name__}); see the server log"
    kind = TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=errors.headers_of(exc))


class OpenAIRoute(APIRoute):
    """Every error a /v1 route raises (validation, auth, limits, unknown model) answered in OpenAI's shape."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def route(request: Request):
            try:
                return await handler(request)
            except Exception as exc:  # the one place /v1 errors are mapped: routes below raise, never catch
                response = openai_error(exc)
                metrics = getattr(request.app.state, "metrics", None)
                if metrics is not None:
                    metrics.gen_errors.labels(str(response.status_code)).inc()
                return response

        return route


async def get_generation(request: Request) -> GenerationService:
    generation = getattr(request.app.state, "generation", None)
    service = getattr(request.app.state, "service", None)
    if generation is None or service is None or not service.ready:
        raise NotReady("the server is starting (loading the backbone and tasks) or stopping; retry shortly")
    return generation


GenerationDep = Annotated[GenerationService, Depends(get_generation)]
router = APIRouter(prefix="/v1", tags=["openai"], route_class=OpenAIRoute,
                   responses={s: {"model": ErrorResponse} for s in (400, 401, 403, 404, 503)})


# -- routes -------------------------------------------------------------------------------------------------


@router.get("/models", response_model=ModelList, **guarded("read"))
async def list_models(gen: GenerationDep) -> ModelList:
    """The generation tasks, each with its active version."""
    return ModelList(data=[ModelCard(id=task, version=version) for task, version in gen.models()])


@router.get("/models/{model}", response_model=ModelCard, **guarded("read"))
async def get_model(model: str, gen: GenerationDep) -> ModelCard:
    key, _ = await gen.resolve(model)
    return ModelCard(id=key[0], version=key[1])


@router.post("/completions", response_model=CompletionResponse, **guarded("predict"))
async def completions(body: CompletionRequest, request: Request, gen: GenerationDep):
    """Text for each prompt: the prompt is the task's input, put into the task's prompt template."""
    key, info = await gen.resolve(body.model)
    params = gen.params(body.max_tokens, COMPLETION_DEFAULT_TOKENS, body.temperature, body.top_p, body.seed,
                        body.stop, info.stop)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    started = start_all(gen, key, [gen.prompt(info, p) for p in prompts], params)
    ident, created, model = f"cmpl-{uuid.uuid4().hex}", int(time.time()), started[0].model
    usage_wanted = bool(body.stream_options and body.stream_options.include_usage)
    if body.stream:
        async def chunks():
            async for i, delta, finish, _ in pieces(gen, started, request, counts):
                yield {"id": ident, "object": "text_completion", "created": created, "model": model,
                       "choices": [{"index": i, "text": delta, "finish_reason": finish, "logprobs": None}]}
            if usage_wanted:
                yield {"id": ident, "object": "text_completion", "created": created, "model": model, "choices": [],
                       "usage": usage(started, counts)}

        counts: dict[int, int] = {}
        return sse(chunks(), started)
    results = await collect(gen, started, request)
    return {"id": ident, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": i, "text": text, "finish_reason": finish, "logprobs": None}
                        for i, (text, finish, _) in enumerate(results)],
            "usage": usage(started, {i: n for i, (_, _, n) in enumerate(results)})}


@router.post("/chat/completions", response_model=ChatResponse, **guarded("predict"))
async def chat_completions(body: ChatRequest, request: Request, gen: GenerationDep):
    """The assistant's answer to one user message, whose content is the task's input."""
    key, info = await gen.resolve(body.model)
    text = user_input(body, key[0])
    limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    params = gen.params(limit, gen.settings.max_tokens, body.temperature, body.top_p, body.seed, body.stop,
                        info.stop, param=param)
    started = start_all(gen, key, [gen.prompt(info, text)], params)
    ident, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), started[0].model
    usage_wanted = bool(body.stream_options and body.stream_options.include_usage)
    if body.stream:
        async def chunks():
            head = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model}
            yield head | {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                       "finish_reason": None, "logprobs": None}]}
            async for i, delta, finish, _ in pieces(gen, started, request, counts):
                if delta:
                    yield head | {"choices": [{"index": i, "delta": {"content": delta}, "finish_reason": None,
                                               "logprobs": None}]}
                if finish is not None:
                    yield head | {"choices": [{"index": i, "delta": {}, "finish_reason": finish, "logprobs": None}]}
            if usage_wanted:
                yield head | {"choices": [], "usage": usage(started, counts)}

        counts: dict[int, int] = {}
        return sse(chunks(), started)
    (content, finish, n), = await collect(gen, started, request)
    return {"id": ident, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish,
                         "logprobs": None}],
            "usage": usage(started, {0: n})}


# -- helpers ------------------------------------------------------------------------------------------------


def user_input(body: ChatRequest, task: str) -> str:
    """The content of the one user message: a task takes one input, with its own instruction (its template)."""
    users = [m for m in body.messages if m.role == "user"]
    others = sorted({m.role for m in body.messages if m.role != "user"})
    if len(users) != 1 or others:
        got = f"{len(users)} user message{'s' if len(users) != 1 else ''}" + (f" and {', '.join(others)} messages"
                                                                              if others else "")
        raise LimitExceeded(f"task {task!r} takes one input: send exactly one user message, whose content goes into "
                            f"the task's prompt template (a generation task has no chat history or system prompt); "
                            f"this request has {got}", "messages")
    content = users[0].content
    if isinstance(content, list):  # content parts: the text ones, joined
        content = "".join(str(p.get("text", "")) for p in content if p.get("type") == "text")
    if not content:
        raise LimitExceeded("the user message has no text", "messages")
    return content


def start_all(gen: GenerationService, key, prompts: list[list[int]], params) -> list[Started]:
    for p in prompts:  # check every prompt before starting any
        gen.check(p, params)
    return [gen.start(key, p, params) for p in prompts]


def usage(started: list[Started], counts: dict[int, int]) -> dict:
    prompt = sum(s.prompt_tokens for s in started)
    done = sum(counts.values())
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}


async def pieces(gen: GenerationService, started: list[Started], request: Request,
                 counts: dict[int, int] | None = None) -> AsyncIterator[tuple[int, str, str | None, int]]:
    """(choice, new text, finish reason or None, tokens so far) as the sequences advance, interleaved. `counts`
    (choice -> tokens so far) is kept up to date for the caller's `usage`; the request's tokens and timings go
    to the metrics when they end, finished or abandoned."""
    queue: asyncio.Queue = asyncio.Queue()
    begun, first = time.perf_counter(), None
    counts = {} if counts is None else counts

    async def follow(i: int, s: Started) -> None:
        tokens: list[int] = []
        text = TextStream(s.stop)
        try:
            async for event in s.stream:
                tokens.extend(event.tokens)
                full = gen.text(tokens)
                delta = text.finish(full) if event.finish is not None else text.push(full)
                if delta or event.finish is not None:
                    await queue.put((i, delta, event.finish, len(tokens)))
        except BaseException as e:  # handed to the consumer, which raises it
            await queue.put(e)
            return

    tasks = [asyncio.create_task(follow(i, s)) for i, s in enumerate(started)]
    left = len(started)
    try:
        while left:
            item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            if item[2] is not None:
                left -= 1
            if first is None and item[1]:
                first = time.perf_counter() - begun
            counts[item[0]] = item[3]
            yield item
    finally:
        for t in tasks:
            t.cancel()
        for s in started:
            s.stream.cancel()  # no-op for a finished one; a client that left frees its slot
        metrics = getattr(request.app.state, "metrics", None)
        if metrics is not None:
            metrics.generated(started[0].task, sum(s.prompt_tokens for s in started), sum(counts.values()), first,
                              time.perf_counter() - begun)


async def collect(gen: GenerationService, started: list[Started], request: Request) -> list[tuple[str, str, int]]:
    """Every choice's (text, finish reason, tokens), or nothing if the client disconnects first (slots freed)."""
    texts: dict[int, list[str]] = {i: [] for i in range(len(started))}
    out: dict[int, tuple[str, str, int]] = {}

    async def run() -> None:
        async for i, delta, finish, n in pieces(gen, started, request):
            texts[i].append(delta)
            if finish is not None:
                out[i] = ("".join(texts[i]), finish, n)

    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)

    work, watcher = asyncio.create_task(run()), asyncio.create_task(watch())
    try:
        await asyncio.wait([work, watcher], return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not work.done():  # the client went away: stop its sequences
            work.cancel()
            for s in started:
                s.stream.cancel()
    if not work.done() or work.cancelled():
        raise asyncio.CancelledError("the client disconnected")
    work.result()  # raises what generation raised
    return [out[i] for i in range(len(started))]


def sse(chunks: AsyncIterator[dict], started: list[Started]) -> StreamingResponse:
    """Server-sent events, `data: {json}` each, ending with `data: [DONE]`; an error mid-stream comes as an
    OpenAI error object, then [DONE]."""

    async def body():
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, ensure_ascii=False, separators=(',', ':'))}\n\n"
        except Exception as exc:
            yield f"data: {openai_error(exc).body.decode()}\n\n"
        finally:
            for s in started:
                s.stream.cancel()
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
