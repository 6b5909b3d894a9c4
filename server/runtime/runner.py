"""The runner: one worker thread owns the engine and its bank, and takes typed commands (load, evict, infer).

As TEI's queue and LoRAX's loader actor do, everything that touches the model goes through one queue, so bank
changes apply strictly between batches, in order: a load that returned before a request was submitted is live for
that request, and no batch ever sees half a change. Requests are tokenised when they are submitted, on the caller's
thread; the worker collects them for at most `max_wait_ms`, up to `max_batch` inputs and `max_batch_tokens`
padded tokens, and runs the batch. Admission is bounded: past `max_queued` waiting inputs, `submit` raises
`Overloaded` (503 with Retry-After) instead of letting memory grow.

The runner keeps what is resident (`info(key)`), readable from any thread; the service above it keeps policy
only (which version of a task is active, which others to keep).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from bitfit.bias_set import BiasSet
from server.errors import NotReady, Overloaded, VersionGone
from server.runtime.bank import RowInfo
from server.runtime.engine import choose_mode
from server.runtime.inputs import Encoded, Item, padded_tokens

log = logging.getLogger(__name__)
_STOP = object()  # put on the queue by stop()


# -- commands: plain data on the worker's queue ----------------------------------------------------------------


@dataclass
class Reply:
    """Where a command's result goes: a future on an event loop (or nowhere); `process.py` has one over a pipe."""

    future: asyncio.Future | None  # None: nobody waits for the result
    loop: asyncio.AbstractEventLoop | None

    def settle(self, value=None, error: BaseException | None = None) -> None:
        if self.future is not None:
            self.loop.call_soon_threadsafe(_settle, self.future, value, error)
        elif error is not None:
            log.error("runner command failed", exc_info=error)


@dataclass
class Infer:
    keys: list[Hashable]  # per input: which task version, as the bank knows it
    inputs: list[Encoded]
    reply: Reply
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class Load:
    key: Hashable
    bias_set: BiasSet
    reply: Reply


@dataclass
class Evict:
    key: Hashable
    reply: Reply


@dataclass
class Reserve:
    rows: int
    reply: Reply


@dataclass
class Call:
    """Run `fn()` on the worker between batches (the generation scheduler's decode steps); nobody waits for it."""

    fn: Callable[[], None]


@dataclass
class Hold:
    gate: threading.Event  # the worker waits on it between batches


@dataclass(frozen=True)
class Result:
    output: list[float]  # the head's outputs for one input: logits (n_labels), or [value] for regression
    truncated: bool


def _settle(future: asyncio.Future, value=None, error: BaseException | None = None) -> None:
    if future.done():  # the client went away and the request was cancelled
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


class Runner:
    def __init__(
        self,
        engine,
        *,
        max_batch: int = 32,
        max_batch_tokens: int = 8192,
        max_wait_ms: float = 5.0,
        max_queued: int = 1024,
        group_max_tasks: int = 1,
        retry_after_s: int = 1,
        on_batch: Callable[[str, int], None] | None = None,  # (mode, inputs) after every engine run
    ):
        self.engine = engine
        self.max_batch, self.max_batch_tokens, self.max_wait = max_batch, max_batch_tokens, max_wait_ms / 1000.0
        self.max_queued, self.group_max_tasks, self.retry_after_s = max_queued, group_max_tasks, retry_after_s
        self.on_batch = on_batch
        self._resident: dict[Hashable, RowInfo] = {}  # written by the worker only; one dict op at a time
        self.bank_bytes = engine.bank.nbytes
        self._queue: queue.Queue = queue.Queue()
        self._queued = 0  # inputs admitted and not yet taken by the worker
        self._lock = threading.Lock()
        self._carry: object | None = None  # what ended the last collection: handled first next round
        self._thread: threading.Thread | None = None
        self._stopping = False

    # -- what is resident (any thread) -----------------------------------------------------------------

    def info(self, key: Hashable) -> RowInfo | None:
        return self._resident.get(key)

    def resident(self) -> list[Hashable]:
        return list(self._resident)

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def spec(self):
        return self.engine.spec

    # -- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="bitfit-runner", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._queue.put(_STOP)
        if self._thread is not None:
            self._thread.join(timeout)
        self._fail_waiting(NotReady("the server is shutting down"))

    # -- commands (event loop side) --------------------------------------------------------------------

    async def submit(self, key: Hashable, items: Sequence[Item]) -> list[Result]:
        """Run `items` through the task version `key`; one Result per item, in order."""
        return await self.submit_many([(key, items)])

    async def submit_many(self, parts: Sequence[tuple[Hashable, Sequence[Item]]]) -> list[Result]:
        """Run each part's items through its task version, all in the same batch (a fan-out of one text to many
        tasks is one gather forward when it fits `max_batch`); one Result per item, parts in order."""
        if self._stopping or self._thread is None:
            raise NotReady("the engine is not running")
        keys = [key for key, items in parts for _ in items]
        items = [x for _, part in parts for x in part]
        with self._lock:
            if self._queued + len(items) > self.max_queued:
                raise Overloaded(f"{self._queued} inputs are already waiting (limit {self.max_queued}); retry shortly",
                                 retry_after=self.retry_after_s)
            self._queued += len(items)
        try:
            encoded = self._encode(items)  # here, so the worker never waits on the tokenizer
        except BaseException:
            with self._lock:
                self._queued -= len(items)
            raise
        reply = self._reply()
        self._queue.put(Infer(keys, encoded, reply))
        return await reply.future

    def _encode(self, items: Sequence[Item]) -> list[Encoded]:
        """One tokenizer call for a fan-out's repeated text: the same input for every task is tokenised once."""
        unique = list(dict.fromkeys(items))
        if len(unique) == len(items):
            return self.engine.encoder.encode(items)
        by_item = dict(zip(unique, self.engine.encoder.encode(unique)))
        return [by_item[x] for x in items]

    async def load(self, key: Hashable, bias_set: BiasSet) -> bool:
        """Make a task version resident (checked first: a bad set changes nothing); False if it already was."""
        return await self._command(Load, key, bias_set)

    async def evict(self, key: Hashable) -> bool:
        return await self._command(Evict, key)

    async def reserve(self, rows: int) -> None:
        await self._command(Reserve, rows)

    async def _command(self, kind, *args):
        if self._thread is None:  # not started (tools driving the engine directly): nothing runs concurrently
            reply = Reply(None, None)
            return self._apply(kind(*args, reply))
        reply = self._reply()
        self._queue.put(kind(*args, reply))
        return await reply.future

    @staticmethod
    def _reply() -> Reply:
        loop = asyncio.get_running_loop()
        return Reply(loop.create_future(), loop)

    def enqueue(self, command) -> None:
        """Queue a command built elsewhere (an engine process's pipe reader), with its own reply; admission was
        decided by whoever took the request."""
        if isinstance(command, Infer):
            with self._lock:
                self._queued += len(command.inputs)
        self._queue.put(command)

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Keep the worker idle between batches while the block runs (maintenance; tests of backpressure)."""
        gate = threading.Event()
        self._queue.put(Hold(gate))
        try:
            yield
        finally:
            gate.set()

    # -- worker side -----------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            item, self._carry = (self._carry, None) if self._carry is not None else (self._queue.get(), None)
            if item is _STOP:
                return
            try:
                if isinstance(item, Infer):
                    self._run(self._collect(item))
                elif isinstance(item, Hold):
                    item.gate.wait()
                elif isinstance(item, Call):
                    item.fn()
                else:
                    self._control(item)
            except Exception:  # the worker must outlive any one batch; _run already answered its requests
                log.exception("runner worker error")

    def _control(self, command) -> None:
        try:
            value, error = self._apply(command), None
        except Exception as e:  # handed to the caller, who maps it to a status
            value, error = None, e
        command.reply.settle(value, error)

    def _apply(self, command):
        bank = self.engine.bank
        if isinstance(command, Load):
            loaded = bank.load(command.key, command.bias_set)
            self._resident[command.key] = bank.info[bank.row(command.key)]
            value = loaded
        elif isinstance(command, Evict):
            value = bank.evict(command.key)
            self._resident.pop(command.key, None)
        elif isinstance(command, Reserve):
            value = bank.reserve(command.rows)
        else:
            raise TypeError(f"unknown runner command {type(command).__name__}")
        self.bank_bytes = bank.nbytes
        return value

    def _take(self, item: Infer) -> None:
        with self._lock:
            self._queued -= len(item.inputs)

    def _collect(self, first: Infer) -> list[Infer]:
        """Requests for up to max_wait, up to max_batch inputs and max_batch_tokens padded tokens; stop early
        at any other command, which then runs before the next batch."""
        self._take(first)
        batch, lengths = [first], [e.length for e in first.inputs]
        deadline = time.perf_counter() + self.max_wait
        while len(lengths) < self.max_batch:
            remaining = deadline - time.perf_counter()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, Infer) and self._fits(lengths, item):
                self._take(item)
                batch.append(item)
                lengths += [e.length for e in item.inputs]
                continue
            self._carry = item  # a bank change, the stop signal or a request that does not fit: next round
            break
        return batch

    def _fits(self, lengths: list[int], item: Infer) -> bool:
        more = [e.length for e in item.inputs]
        return (len(lengths) + len(more) <= self.max_batch
                and padded_tokens(lengths + more) <= self.max_batch_tokens)

    def _run(self, batch: list[Infer]) -> None:
        bank, live, rows = self.engine.bank, [], []
        for p in batch:
            gone = next((k for k in p.keys if k not in bank), None)
            if gone is None:
                live.append(p)
                rows.extend(bank.row(k) for k in p.keys)
            else:  # evicted between admission and this batch
                p.reply.settle(None, VersionGone(gone))
        if not live:
            return
        inputs = [e for p in live for e in p.inputs]
        try:
            results = self._infer(inputs, rows)
        except Exception as e:
            log.exception("batch of %d inputs failed", len(inputs))
            for p in live:
                p.reply.settle(None, e)
            return
        start = 0
        for p in live:
            p.reply.settle(results[start : start + len(p.inputs)])
            start += len(p.inputs)

    def _infer(self, inputs: list[Encoded], rows: list[int]) -> list[Result]:
        results: list[Result] = []
        for chunk in self._chunks(inputs):  # one request may hold more than a batch
            chunk_rows = rows[chunk.start : chunk.stop]
            part = inputs[chunk.start : chunk.stop]
            mode = choose_mode(len(set(chunk_rows)), self.group_max_tasks)
            out = self.engine.run(self.engine.collate(part), chunk_rows, mode)
            if self.on_batch is not None:
                self.on_batch(out.mode, len(part))
            values = out.logits.tolist()  # one host conversion per batch
            results.extend(Result(v[:w], e.truncated) for v, w, e in zip(values, out.widths, part))
        return results

    def _chunks(self, inputs: list[Encoded]) -> Iterator[slice]:
        start, lengths = 0, []
        for i, e in enumerate(inputs):
            if lengths and (len(lengths) >= self.max_batch or padded_tokens(lengths + [e.length]) > self.max_batch_tokens):
                yield slice(start, i)
                start, lengths = i, []
            lengths.append(e.length)
        if lengths:
            yield slice(start, len(inputs))

    def _fail_waiting(self, error: Exception) -> None:
        if self._carry is not None:
            self._queue.put(self._carry)
            self._carry = None
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            reply = getattr(item, "reply", None)
            if reply is not None and reply.future is not None:
                reply.settle(None, error)
