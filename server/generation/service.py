"""Generation requests as the HTTP layer sees them: `task[@version]` names, the task's prompt, limits, no HTTP.

A generation task is a function of one input: the request's text is put into the task's prompt template (from its
bias set) and the task's stop sequences always apply, beside the request's own. `model` names the task (its active
version) or pins one with `task@version`; a pinned version is loaded if it is stored but not resident.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from bias_store.errors import InvalidTaskName, TaskNotFound, VersionNotFound
from bitfit.lm import MAX_STOP_CHARS, MAX_STOPS, render_prompt
from server.errors import InvalidInput

from server.generation.sampling import SamplingParams
from server.generation.scheduler import GenerationScheduler, GenerationStream

log = logging.getLogger(__name__)


class ModelNotFound(TaskNotFound):
    """`model` names no task (or no version of it) this server has."""

    def __init__(self, model: str, why: str = ""):
        self.task, self.model = model, model
        Exception.__init__(self, f"the model {model!r} does not exist{why}; GET /v1/models lists the generation "
                                 "tasks this server has (pin a version with task@version)")


class NotGenerationTask(InvalidInput):
    """A classification task named as a generation model."""


class LimitExceeded(InvalidInput):
    """A request over the server's limits; `param` names the field."""

    def __init__(self, message: str, param: str | None = None):
        self.param = param
        super().__init__(message)


@dataclass(frozen=True)
class Started:
    """A sequence on its way: its stream of token events, what answered, and the prompt's length in tokens."""

    stream: GenerationStream
    task: str
    version: str
    prompt_tokens: int
    stop: tuple[str, ...]  # where its text ends

    @property
    def model(self) -> str:
        return f"{self.task}@{self.version}"


def parse_model(model: str) -> tuple[str, str | None]:
    task, at, version = model.partition("@")
    return task, (version if at else None)


class GenerationService:
    def __init__(self, tasks, scheduler: GenerationScheduler, settings):
        self.tasks, self.scheduler, self.settings = tasks, scheduler, settings
        self.tokenizer = scheduler.tokenizer

    def models(self) -> list[tuple[str, str]]:
        """(task, active version) of every resident generation task, by name."""
        out = []
        for task, version in sorted(self.tasks.active.items()):
            info = self.tasks.runner.info((task, version))
            if info is not None and info.generates:
                out.append((task, version))
        return out

    async def resolve(self, model: str):
        """(task, version, RowInfo) answering `model`; 404 for no such task or version, 400 for a classifier."""
        task, version = parse_model(model)
        try:
            key = await self.tasks.resolve(task, version or None)
        except (TaskNotFound, VersionNotFound, InvalidTaskName) as e:
            raise ModelNotFound(model, f" ({e})" if version else "") from None
        info = self.tasks.runner.info(key)
        if info is None or not info.generates:
            raise NotGenerationTask(f"task {task!r} is a classification task, not a generation task: ask it with "
                                    f"POST /predict?task={task} (GET /v1/models lists the generation tasks)")
        return key, info

    def params(self, max_tokens: int | None, default_tokens: int, temperature: float, top_p: float,
               seed: int | None, stop: str | list[str] | None, task_stop: tuple[str, ...],
               param: str = "max_tokens") -> SamplingParams:
        limit = self.settings.max_tokens
        n = default_tokens if max_tokens is None else max_tokens
        if n > limit:
            raise LimitExceeded(f"{param} is {n}, over this server's limit of {limit} new tokens "
                                "(BITFIT_MAX_TOKENS)", param)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > MAX_STOPS or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise LimitExceeded(f"stop takes at most {MAX_STOPS} sequences of 1 to {MAX_STOP_CHARS} characters",
                                "stop")
        return SamplingParams(max_tokens=min(n, limit), temperature=temperature, top_p=top_p, seed=seed,
                              stop=tuple(dict.fromkeys(list(task_stop) + stops)))

    def prompt(self, info, text: str) -> list[int]:
        if len(text) > self.settings.max_text_chars:
            raise LimitExceeded(f"the input is {len(text):,} characters, over the limit of "
                                f"{self.settings.max_text_chars:,} (BITFIT_MAX_TEXT_CHARS)", "prompt")
        ids = self.tokenizer(render_prompt(info.prompt_template, text), add_special_tokens=False)["input_ids"]
        return ids

    def check(self, prompt: list[int], params: SamplingParams) -> None:
        context = self.scheduler.context
        if len(prompt) + params.max_tokens > context:
            raise LimitExceeded(f"the prompt is {len(prompt)} tokens and max_tokens {params.max_tokens}: over the "
                                f"model's context of {context} tokens", "max_tokens")

    def start(self, key, prompt: list[int], params: SamplingParams) -> Started:
        self.check(prompt, params)
        stream = GenerationStream(self.scheduler, key, prompt, params)
        return Started(stream, key[0], key[1], len(prompt), params.stop)

    def text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)


def build_generation(runner, tasks, settings) -> GenerationService | None:
    """The generation service over the runner's engine, or None where the backbone cannot generate (an encoder)
    or the engine is not a torch one."""
    remote = getattr(runner, "generation", None)
    if remote is not None:  # the engine in its own process, with its scheduler (server/generation/remote.py)
        return GenerationService(tasks, remote, settings)
    engine = getattr(runner, "engine", None)
    spec = getattr(runner, "spec", None)
    if getattr(spec, "generates", False) and settings.backend != "torch":
        log.warning("generation (/v1) needs the torch backend (a KV cache); with --backend %s this server answers "
                    "/predict only: serve generation tasks with --backend torch", settings.backend)
        return None
    if engine is None or spec is None or not getattr(spec, "generates", False) or engine.name != "torch":
        return None
    from server.runtime.runner import Call

    scheduler = GenerationScheduler(engine, post=lambda fn: runner.enqueue(Call(fn)), slots=settings.generation_slots,
                                    max_queued=settings.generation_max_queued, retry_after_s=settings.retry_after_s)
    return GenerationService(tasks, scheduler, settings)
