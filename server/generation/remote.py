"""Generation with the engine in its own process (`server/runtime/process.py`): the scheduler runs in the child,
beside the runner that owns the engine; the server's process holds `RemoteScheduler`, with the scheduler's
interface (`submit`, `cancel`, `tokenizer`, `context`), over the same pipe:

    parent                                          pipe                          child
    RemoteScheduler.submit (admission here)  --("generate", id, key, prompt, params)-->  GenerationScheduler.submit
    RemoteScheduler.cancel                   --("cancel", 0, id)                   -->  GenerationScheduler.cancel
    emit(event) on the reader thread         <--("gen", id, Event)                 ---  after every step
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Sequence

from server.errors import Overloaded
from server.generation.sampling import SamplingParams
from server.generation.scheduler import Event, GenerationScheduler


def child_scheduler(engine, runner, settings) -> GenerationScheduler | None:
    """The scheduler over the child's engine, or None where the backbone does not generate."""
    if not getattr(engine.spec, "generates", False) or engine.name != "torch":
        return None
    from server.runtime.runner import Call

    return GenerationScheduler(engine, post=lambda fn: runner.enqueue(Call(fn)), slots=settings.generation_slots,
                               max_queued=1 << 30, retry_after_s=settings.retry_after_s)  # admission: the parent


class ChildGeneration:
    """The child's side: pipe messages in, the scheduler's events out."""

    def __init__(self, scheduler: GenerationScheduler, send: Callable[[tuple], None]):
        self.scheduler, self.send = scheduler, send
        self._ids: dict[int, int] = {}  # the parent's id -> the scheduler's

    def generate(self, ident: int, key: Hashable, prompt: list[int], params: SamplingParams) -> None:
        from server.runtime.process import portable

        def emit(event: Event) -> None:
            if event.finish is not None or event.error is not None:
                self._ids.pop(ident, None)
            self.send(("gen", ident, Event(event.tokens, event.finish, portable(event.error))))

        try:
            self._ids[ident] = self.scheduler.submit(key, prompt, params, emit)
        except Exception as e:
            self.send(("gen", ident, Event(error=portable(e))))

    def cancel(self, ident: int) -> None:
        sid = self._ids.pop(ident, None)
        if sid is not None:
            self.scheduler.cancel(sid)


class RemoteScheduler:
    """The parent's side: what `GenerationStream` and `GenerationService` use, over the engine process's pipe."""

    def __init__(self, runner, tokenizer, context: int, slots: int, max_queued: int, retry_after_s: int = 1):
        self.runner, self.tokenizer, self.context = runner, tokenizer, context
        self.limit, self.retry_after_s = slots + max_queued, retry_after_s
        self._emit: dict[int, Callable[[Event], None]] = {}
        self._lock = threading.Lock()

    @property
    def active(self) -> int:
        return len(self._emit)

    def submit(self, key: Hashable, prompt: Sequence[int], params: SamplingParams,
               emit: Callable[[Event], None]) -> int:
        with self._lock:
            if len(self._emit) >= self.limit:
                raise Overloaded(f"{len(self._emit)} generation requests are running or waiting (limit "
                                 f"{self.limit}); retry shortly", retry_after=self.retry_after_s)
            ident = self.runner.next_id()
            self._emit[ident] = emit
        try:
            self.runner.send_message(("generate", ident, key, list(prompt), params))
        except BaseException:
            self._emit.pop(ident, None)
            raise
        return ident

    def cancel(self, ident: int) -> None:
        if self._emit.pop(ident, None) is not None:
            self.runner.send_message(("cancel", 0, ident))

    def deliver(self, ident: int, event: Event) -> None:
        """An event from the child (the runner's reader thread)."""
        if event.finish is not None or event.error is not None:
            emit = self._emit.pop(ident, None)
        else:
            emit = self._emit.get(ident)
        if emit is not None:
            emit(event)

    def fail_all(self, error: Exception) -> None:
        waiting, self._emit = self._emit, {}
        for emit in waiting.values():
            emit(Event(error=error))
