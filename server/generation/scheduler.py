"""Continuous batching: every decode step is one forward over all running sequences, whatever their tasks.

The scheduler runs on the runner's worker thread, one step per `Call` command on the runner's queue, so bank
changes and classification batches interleave with decode steps and never run beside one. A step:

1. cancelled sequences leave (a client that disconnected frees its slot at the next step);
2. one decode forward: every running sequence's last token in, one new token out per row; a row that ends
   (eos, a stop sequence, `max_tokens`) leaves the batch;
3. waiting requests join, up to `slots` running: one prefill forward over their prompts (left-padded), the first
   token of each, then their KV caches join the batch's (`cache.join`);
4. if anything runs or waits, the next step goes to the back of the runner's queue.

Each sequence takes a copy of its task's bank row when it joins (`Sequence.biases`, (N,)), and every forward
reads each row's biases from the stack of those copies (`BatchMapping.biases`, (b, N)) through the banked-bias
layers: sequences of any number of tasks share a forward, and an upload, activation or rollback (or an eviction
that reuses the row) reaches only the requests that start after it, never one in the middle of its text.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence as Seq
from dataclasses import dataclass, field

import torch

from bitfit.generate import left_pad, positions_of
from server.errors import Overloaded, VersionGone
from server.generation import cache as kv
from server.generation.sampling import Sampler, SamplingParams, pick_tokens
from server.generation.stops import find_stop

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Event:
    """What a sequence hands its caller after a step: new token ids, and why it ended (once)."""

    tokens: tuple[int, ...] = ()
    finish: str | None = None  # "stop" (eos or a stop sequence), "length" (max_tokens), or None: more to come
    error: BaseException | None = None


@dataclass
class Request:
    ident: int
    key: Hashable  # (task, version): the bank row it starts from
    prompt: list[int]  # token ids
    params: SamplingParams
    emit: Callable[[Event], None]  # called on the worker thread; must not block
    submitted: float = field(default_factory=time.perf_counter)


@dataclass
class Sequence:
    """A running row of the batch (worker thread only)."""

    request: Request
    biases: torch.Tensor  # (N,) its task's absolute biases, copied from the bank when it joined
    sampler: Sampler
    tokens: list[int] = field(default_factory=list)  # new tokens so far (eos excluded)
    last: int = -1  # the last token picked: the next decode step's input
    position: int = 0  # the position of `last`


@dataclass
class Stats:
    steps: int = 0  # decode forwards
    prefills: int = 0  # prefill forwards
    tokens: int = 0  # tokens picked (eos included)
    row_steps: int = 0  # sum over decode steps of the rows in them
    max_rows: int = 0
    finished: int = 0
    cancelled: int = 0


class GenerationScheduler:
    def __init__(
        self,
        engine,
        *,
        post: Callable[[Callable[[], None]], None] | None = None,  # puts a step on the worker; None: call step()
        slots: int = 16,  # sequences decoding at once; more wait
        max_queued: int = 256,  # requests waiting to join at most; beyond, Overloaded
        context: int | None = None,  # prompt + new tokens at most (default: the model's positions)
        retry_after_s: int = 1,
    ):
        from bitfit.lm import eos_ids, language_model

        self.engine, self.post = engine, post
        self.slots, self.max_queued, self.retry_after_s = slots, max_queued, retry_after_s
        self.lm = language_model(engine.backbone)  # the LM head over the engine's (wrapped) model
        self.model = engine.model
        self.tokenizer = engine.tokenizer
        self.eos = set(eos_ids(self.tokenizer))
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos, default=0)
        self.context = context or int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.device = engine.device
        self.stats = Stats()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._pending: deque[Request] = deque()
        self._cancelled: set[int] = set()
        self._scheduled = False
        # the running batch (worker thread only)
        self.running: list[Sequence] = []
        self._cache = None
        self._mask: torch.Tensor | None = None  # (rows, columns) 1 where a row has a token
        self._biases: torch.Tensor | None = None  # (rows, N) stacked from the running sequences

    # -- any thread ------------------------------------------------------------------------------------

    @property
    def waiting(self) -> int:
        return len(self._pending)

    @property
    def active(self) -> int:
        """Sequences running or waiting to join."""
        return len(self.running) + len(self._pending)

    def submit(self, key: Hashable, prompt: Seq[int], params: SamplingParams,
               emit: Callable[[Event], None]) -> int:
        """Queue a sequence; its events go to `emit` (on the worker thread). Returns its id (for `cancel`)."""
        if not prompt:
            raise ValueError("the prompt holds no token")
        request = Request(next(self._ids), key, list(prompt), params, emit)
        with self._lock:
            if len(self._pending) >= self.max_queued:
                raise Overloaded(f"{len(self._pending)} generation requests are already waiting "
                                 f"(limit {self.max_queued}); retry shortly", retry_after=self.retry_after_s)
            self._pending.append(request)
        self._wake()
        return request.ident

    def cancel(self, ident: int) -> None:
        """Stop a sequence (its client went away): it leaves the batch at the next step; no more events."""
        with self._lock:
            for r in self._pending:
                if r.ident == ident:
                    self._pending.remove(r)
                    self.stats.cancelled += 1
                    return
            self._cancelled.add(ident)
        self._wake()

    def _wake(self) -> None:
        if self.post is None:
            return
        with self._lock:
            if self._scheduled:
                return
            self._scheduled = True
        self.post(self._step_and_continue)

    def _step_and_continue(self) -> None:
        try:
            self.step()
        except Exception as e:  # a failed forward fails its sequences, not the worker
            log.exception("generation step failed")
            self._fail_all(e)
        with self._lock:
            again = bool(self.running or self._pending or self._cancelled)
            self._scheduled = again
        if again:
            self.post(self._step_and_continue)

    # -- the worker ------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> None:
        """One step of the loop (module docstring). Tests and tools without a worker call it directly."""
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
        if cancelled:
            gone = [i for i, s in enumerate(self.running) if s.request.ident in cancelled]
            self.stats.cancelled += len(gone)
            self._leave(gone)
        if self.running:
            self._decode()
        free = self.slots - len(self.running)
        joining = []
        with self._lock:
            while free > 0 and self._pending:
                joining.append(self._pending.popleft())
                free -= 1
        if joining:
            self._join(joining)

    def run_until_idle(self, max_steps: int = 100_000) -> None:
        """Step until nothing runs or waits (tests, benchmarks, tools driving the engine directly)."""
        for _ in range(max_steps):
            if not (self.running or self._pending or self._cancelled):
                return
            self.step()
        raise RuntimeError(f"generation still running after {max_steps} steps")

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache,
                 biases: torch.Tensor) -> torch.Tensor:
        """Logits (b, vocab) of each row's last position, every row with its own biases (b, N)."""
        engine = self.engine
        if getattr(engine, "_zero_for_gather", False) and engine._in_flat is not None:
            engine.flat.zero_()  # a generic wrapper runs its module with its own bias: it must add nothing
            engine._in_flat = None
        engine.mapping.biases = biases
        try:
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
        finally:
            engine.mapping.biases = None
        return self.lm.logits(out.last_hidden_state[:, -1])  # (b, vocab)

    def _decode(self) -> None:
        rows = self.running
        tokens = torch.tensor([[s.last] for s in rows], device=self.device)  # (b, 1)
        positions = torch.tensor([[s.position + 1] for s in rows], device=self.device)  # (b, 1)
        self._mask = torch.cat([self._mask, torch.ones(len(rows), 1, dtype=self._mask.dtype, device=self.device)], 1)
        logits = self._forward(tokens, self._mask, positions, self._cache, self._biases)
        self.stats.steps += 1
        self.stats.row_steps += len(rows)
        self.stats.max_rows = max(self.stats.max_rows, len(rows))
        for s in rows:
            s.position += 1
        self._accept(rows, pick_tokens(logits, [s.sampler for s in rows]))

    def _join(self, requests: list[Request]) -> None:
        bank, joined = self.engine.bank, []
        for r in requests:
            if r.key not in bank:  # evicted between the request's check and this step
                r.emit(Event(error=VersionGone(r.key)))
                continue
            biases = bank.rows[bank.row(r.key)].clone()  # (N,) this sequence's own, for its whole life
            joined.append(Sequence(r, biases, Sampler(r.params)))
        if not joined:
            return
        ids, mask = (t.to(self.device) for t in left_pad([s.request.prompt for s in joined], self.pad))
        positions = positions_of(mask)
        biases = torch.stack([s.biases for s in joined])  # (k, N)
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        logits = self._forward(ids, mask, positions, cache, biases)
        self.stats.prefills += 1
        for s in joined:
            s.position = len(s.request.prompt) - 1
        if self.running:
            self._cache, self._mask = kv.join(self._cache, self._mask, cache, mask)
            self._biases = torch.cat([self._biases, biases])
        else:
            self._cache, self._mask, self._biases = cache, mask, biases
        self.running = self.running + joined
        self._accept(joined, pick_tokens(logits, [s.sampler for s in joined]))

    def _accept(self, rows: list[Sequence], tokens: list[int]) -> None:
        """Hand each row its new token; rows that end leave the batch."""
        done = []
        for s, token in zip(rows, tokens):
            self.stats.tokens += 1
            finish = self._finish(s, token)
            s.last = token
            ends = token in self.eos and not s.request.params.ignore_eos
            s.request.emit(Event(() if ends else (token,), finish))
            if finish is not None:
                done.append(s)
        if done:
            self.stats.finished += len(done)
            ids = {id(s) for s in done}
            self._leave([i for i, s in enumerate(self.running) if id(s) in ids])

    def _finish(self, s: Sequence, token: int) -> str | None:
        if token in self.eos and not s.request.params.ignore_eos:
            return "stop"
        s.tokens.append(token)
        stop = s.request.params.stop
        if stop and find_stop(self.tokenizer.decode(s.tokens, skip_special_tokens=True), stop) is not None:
            return "stop"
        if len(s.tokens) >= s.request.params.max_tokens or s.position + 2 > self.context:
            return "length"
        return None

    def _leave(self, indices: list[int]) -> None:
        if not indices:
            return
        gone = set(indices)
        keep = [i for i in range(len(self.running)) if i not in gone]
        self.running = [self.running[i] for i in keep]
        if not keep:
            self._cache = self._mask = self._biases = None
            return
        index = torch.tensor(keep, device=self.device)
        self._mask = kv.select(self._cache, self._mask, index)
        self._mask = kv.trim(self._cache, self._mask)
        self._biases = self._biases.index_select(0, index)

    def _fail_all(self, error: Exception) -> None:
        for s in self.running:
            s.request.emit(Event(error=error))
        self.running, self._cache, self._mask, self._biases = [], None, None, None
        with self._lock:
            pending, self._pending = list(self._pending), deque()
        for r in pending:
            r.emit(Event(error=error))


class GenerationStream:
    """The event-loop side of one sequence: `async for event in stream`, and `cancel()` when the client leaves."""

    def __init__(self, scheduler: GenerationScheduler, key: Hashable, prompt: Seq[int], params: SamplingParams):
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.scheduler, self.done = scheduler, False
        self.ident = scheduler.submit(key, prompt, params, lambda e: loop.call_soon_threadsafe(self.queue.put_nowait, e))

    def __aiter__(self):
        return self

    async def __anext__(self) -> Event:
        if self.done:
            raise StopAsyncIteration
        event = await self.queue.get()
        if event.error is not None:
            self.done = True
            raise event.error
        if event.finish is not None:
            self.done = True
        return event

    def cancel(self) -> None:
        if not self.done:
            self.done = True
            self.scheduler.cancel(self.ident)
