"""The batcher: requests from the event loop, batches for the engine, one worker thread that owns the model.

Requests wait at most `max_wait_ms` for company, up to `max_batch` inputs. Changes to the bank are
queued on the same queue as requests, so the worker applies them strictly between batches, in order:
an upload that returned before a request was sent is live for that request, and no batch ever sees
half a change. Admission is bounded: past `max_queued` waiting inputs, `submit` raises `Overloaded`
(503 with Retry-After) instead of letting memory grow.
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

import torch

from server.engine import Engine, Item
from server.errors import NotReady, Overloaded, VersionGone

log = logging.getLogger(__name__)
_STOP = object()  # put on the queue by stop()


@dataclass
class Pending:
    key: Hashable  # which task version, as the bank knows it
    items: Sequence[Item]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class Control:
    fn: Callable
    args: tuple
    future: asyncio.Future | None  # None: nobody waits for the result
    loop: asyncio.AbstractEventLoop | None


@dataclass(frozen=True)
class Result:
    output: torch.Tensor  # (n_out,) float32 on the CPU
    truncated: bool


def choose_mode(counts: Sequence[int], group_max_tasks: int = 1) -> str:
    """How to run a batch holding `counts[k]` inputs of its k-th task.

    One task: swap. Up to `group_max_tasks` tasks: one swap forward per task (group). More: gather,
    whose cost does not grow with the number of tasks.
    """
    if len(counts) <= 1:
        return "swap"
    return "group" if len(counts) <= group_max_tasks else "gather"


def _settle(future: asyncio.Future, value=None, error: BaseException | None = None) -> None:
    if future.done():  # the client went away and the request was cancelled
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


class Batcher:
    def __init__(
        self,
        engine: Engine,
        *,
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        max_queued: int = 1024,
        group_max_tasks: int = 1,
        retry_after_s: int = 1,
        on_batch: Callable[[str, int], None] | None = None,  # (mode, inputs) after every engine run
    ):
        self.engine = engine
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000.0
        self.max_queued, self.group_max_tasks, self.retry_after_s = max_queued, group_max_tasks, retry_after_s
        self.on_batch = on_batch
        self._queue: queue.Queue = queue.Queue()
        self._queued = 0  # inputs admitted and not yet taken by the worker
        self._lock = threading.Lock()
        self._carry: object | None = None  # what ended the last collection: handled first next round
        self._thread: threading.Thread | None = None
        self._stopping = False

    @property
    def queued(self) -> int:
        return self._queued

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="bitfit-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._queue.put(_STOP)
        if self._thread is not None:
            self._thread.join(timeout)
        self._fail_waiting(NotReady("the server is shutting down"))

    # -- event-loop side ---------------------------------------------------------------------------------

    async def submit(self, key: Hashable, items: Sequence[Item]) -> list[Result]:
        """Run `items` through the task version `key`; one Result per item, in order."""
        if self._stopping or self._thread is None:
            raise NotReady("the engine is not running")
        with self._lock:
            if self._queued + len(items) > self.max_queued:
                raise Overloaded(f"{self._queued} inputs are already waiting (limit {self.max_queued}); retry shortly",
                                 retry_after=self.retry_after_s)
            self._queued += len(items)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put(Pending(key, items, future, loop))
        return await future

    async def call(self, fn: Callable, *args):
        """Run `fn(*args)` on the worker thread between batches (bank changes); returns its result."""
        if self._thread is None:  # not started (tests driving the engine directly): nothing runs concurrently
            return fn(*args)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put(Control(fn, args, future, loop))
        return await future

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Keep the worker idle between batches while the block runs (maintenance; tests of backpressure)."""
        gate = threading.Event()
        self._queue.put(Control(gate.wait, (), None, None))
        try:
            yield
        finally:
            gate.set()

    # -- worker side -------------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            item, self._carry = (self._carry, None) if self._carry is not None else (self._queue.get(), None)
            if item is _STOP:
                return
            try:
                if isinstance(item, Control):
                    self._control(item)
                else:
                    self._run(self._collect(item))
            except Exception:  # the worker must outlive any one batch; _run already answered its requests
                log.exception("engine worker error")

    def _take(self, pending: Pending) -> None:
        with self._lock:
            self._queued -= len(pending.items)

    def _collect(self, first: Pending) -> list[Pending]:
        """Gather requests for up to max_wait, up to max_batch inputs; stop early at a bank change."""
        self._take(first)
        batch, n = [first], len(first.items)
        deadline = time.perf_counter() + self.max_wait
        while n < self.max_batch:
            remaining = deadline - time.perf_counter()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, Pending) and n + len(item.items) <= self.max_batch:
                self._take(item)
                batch.append(item)
                n += len(item.items)
                continue
            self._carry = item  # a bank change, the stop signal or a request that does not fit: next round
            break
        return batch

    def _control(self, c: Control) -> None:
        try:
            value, error = c.fn(*c.args), None
        except Exception as e:  # handed to the caller, who maps it to a status
            value, error = None, e
        if c.future is not None:
            c.loop.call_soon_threadsafe(_settle, c.future, value, error)
        elif error is not None:
            log.error("bank change failed", exc_info=error)

    def _run(self, batch: list[Pending]) -> None:
        bank, live, rows = self.engine.bank, [], []
        for p in batch:
            if p.key in bank:
                live.append(p)
                rows.extend([bank.row(p.key)] * len(p.items))
            else:  # removed between admission and this batch
                p.loop.call_soon_threadsafe(_settle, p.future, None, VersionGone(p.key))
        if not live:
            return
        items = [x for p in live for x in p.items]
        try:
            results = self._infer(items, torch.tensor(rows, dtype=torch.long))
        except Exception as e:
            log.exception("batch of %d inputs failed", len(items))
            for p in live:
                p.loop.call_soon_threadsafe(_settle, p.future, None, e)
            return
        start = 0
        for p in live:
            p.loop.call_soon_threadsafe(_settle, p.future, results[start : start + len(p.items)])
            start += len(p.items)

    def _infer(self, items: list[Item], rows: torch.Tensor) -> list[Result]:
        results: list[Result] = []
        for s in range(0, len(items), self.max_batch):  # one request may hold more inputs than a batch
            chunk, chunk_rows = items[s : s + self.max_batch], rows[s : s + self.max_batch]
            encoded, truncated = self.engine.encode(chunk)
            counts = torch.unique(chunk_rows, return_counts=True)[1].tolist()
            out = self.engine.run(encoded, chunk_rows, choose_mode(counts, self.group_max_tasks))
            if self.on_batch is not None:
                self.on_batch(out.mode, len(chunk))
            results.extend(Result(o, t) for o, t in zip(out.outputs, truncated))
        return results

    def _fail_waiting(self, error: Exception) -> None:
        if self._carry is not None:
            self._queue.put(self._carry)
            self._carry = None
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, (Pending, Control)) and item.future is not None:
                item.loop.call_soon_threadsafe(_settle, item.future, None, error)
