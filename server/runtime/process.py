"""The runner in its own process: the engine, its bank and a `Runner` in a child; the server keeps a
`ProcessRunner` with the runner's interface.

Why a process: the model's Python never competes with the HTTP server's for one interpreter lock, and an engine
that dies (out of memory, a crash in native code) fails its waiting requests with 503 and stops the server for its
supervisor to restart, instead of hanging them. Throughput is the same as the engine on a thread: measured on one
core, MiniLM, 64 clients (docs/engine.md, "The engine in its own process"), 38.5 / 41.8 seq/s against 43.5 / 41.1.
(An earlier measurement that put the thread 28 % behind was the allocator's doing, fixed in `bank.table`.)
vLLM's engine core runs outside its API server's process for the first reason.

    parent (uvicorn, TaskService)            pipe                 child (engine process)
    submit_many -> tokenise, admit   --("infer", id, keys, inputs)-->  Runner.enqueue(Infer)  -> batches
    load / evict / reserve / hold    --("load", id, key, bytes)  -->   Runner.enqueue(Load)
    futures settled by a reader      <--("reply", id, value, error)--  the worker, after each command
    metrics                          <--("batch", mode, inputs)  --    after every forward

Requests are tokenised in the parent at submit (the child sends its `Encoder` once, at start), so the child only
pads and runs. Bias sets cross as their safetensors bytes. If the child dies, every waiting request fails with
503, `/readyz` says why, and the server stops so that its supervisor starts a new one.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing as mp
import os
import signal
import threading
from collections.abc import Hashable, Iterator, Sequence
from contextlib import contextmanager

from bitfit.bias_set import BiasSet
from server.errors import NotReady, Overloaded
from server.runtime.bank import RowInfo
from server.runtime.inputs import Item

log = logging.getLogger(__name__)
START_TIMEOUT_S = 600.0  # loading (and, for some backends, exporting) a backbone


# -- the child --------------------------------------------------------------------------------------------------


class PipeReply:
    """A reply that goes back over the pipe; for bank changes it carries what is resident after the change."""

    def __init__(self, send, ident: int, runner=None, key: Hashable = None):
        self.send, self.ident, self.runner, self.key = send, ident, runner, key

    def settle(self, value=None, error: BaseException | None = None) -> None:
        extra = None
        if self.runner is not None:  # on the worker, right after the change: consistent with the bank
            extra = (self.key, self.runner.info(self.key) if self.key is not None else None, self.runner.bank_bytes)
        self.send(("reply", self.ident, value, portable(error), extra))


def portable(error: BaseException | None) -> BaseException | None:
    """The error itself if it survives pickling (the server's and the store's do), else its message."""
    if error is None:
        return None
    import pickle

    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


def child_main(conn, settings, runner_kwargs: dict) -> None:
    """Build the engine, report it, then turn pipe messages into runner commands until told to stop."""
    from server.runtime.backend import build_engine
    from server.runtime.runner import Evict, Hold, Infer, Load, Reserve, Runner

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when this process ends
    lock = threading.Lock()

    def send(message) -> None:
        with lock:
            conn.send(message)

    try:
        engine = build_engine(settings)
    except BaseException as e:
        send(("failed", portable(e)))
        return
    runner = Runner(engine, on_batch=lambda mode, n: send(("batch", mode, n)), **runner_kwargs)
    runner.start()
    from server.generation.remote import ChildGeneration, child_scheduler

    scheduler = child_scheduler(engine, runner, settings)
    generation = ChildGeneration(scheduler, send) if scheduler is not None else None
    send(("ready", engine.spec, engine.encoder, engine.name, runner.bank_bytes,
          (engine.tokenizer, scheduler.context) if scheduler is not None else None))
    gates: dict[int, threading.Event] = {}
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            break
        kind, ident, *args = message
        if kind == "stop":
            break
        if kind == "infer":
            keys, inputs = args
            runner.enqueue(Infer(keys, inputs, PipeReply(send, ident)))
        elif kind == "load":
            key, data = args
            try:
                bias_set = BiasSet.from_bytes(data)
            except Exception as e:
                send(("reply", ident, None, portable(e), None))
                continue
            runner.enqueue(Load(key, bias_set, PipeReply(send, ident, runner, key)))
        elif kind == "evict":
            runner.enqueue(Evict(args[0], PipeReply(send, ident, runner, args[0])))
        elif kind == "reserve":
            runner.enqueue(Reserve(args[0], PipeReply(send, ident, runner)))
        elif kind == "hold":
            gates[ident] = threading.Event()
            runner.enqueue(Hold(gates[ident]))
        elif kind == "release":
            gates.pop(args[0], threading.Event()).set()
        elif kind == "generate" and generation is not None:
            generation.generate(ident, *args)
        elif kind == "cancel" and generation is not None:
            generation.cancel(args[0])
    for gate in gates.values():
        gate.set()
    runner.stop()


# -- the parent -------------------------------------------------------------------------------------------------


class ProcessRunner:
    """The runner's interface (what `TaskService` and the routes use), over an engine in a child process."""

    def __init__(self, settings, *, max_queued: int = 1024, retry_after_s: int = 1, on_batch=None, **runner_kwargs):
        self.settings, self.max_queued, self.retry_after_s, self.on_batch = settings, max_queued, retry_after_s, on_batch
        self.runner_kwargs = runner_kwargs | {"max_queued": 1 << 30}  # admission happens here, in the parent
        self._resident: dict[Hashable, RowInfo] = {}
        self._waiting: dict[int, tuple[asyncio.Future, asyncio.AbstractEventLoop, int]] = {}  # id -> (future, loop, inputs)
        self._ids = itertools.count(1)
        self._queued = 0  # inputs sent and not yet answered
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self.bank_bytes = 0
        self.spec = self.encoder = self.backend = None
        self.failure: str | None = None  # why the engine process is not running
        self.generation = None  # a RemoteScheduler where the backbone generates (server/generation/remote.py)
        self._stopping = False

    # -- what is resident (any thread) -----------------------------------------------------------------

    def info(self, key: Hashable) -> RowInfo | None:
        return self._resident.get(key)

    def resident(self) -> list[Hashable]:
        return list(self._resident)

    @property
    def queued(self) -> int:
        return self._queued

    # -- lifecycle -------------------------------------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Start the engine process and wait until it has loaded the backbone (raises what it could not do)."""
        ctx = mp.get_context("spawn")  # a fresh interpreter: no copied threads, locks or CUDA state
        self._conn, child = ctx.Pipe()
        self.process = ctx.Process(target=child_main, args=(child, self.settings, self.runner_kwargs),
                                   name="bitfit-engine", daemon=True)
        self.process.start()
        child.close()
        if not self._conn.poll(timeout):
            self.process.kill()
            raise NotReady(f"the engine process did not load the backbone within {timeout:.0f} s")
        try:
            message = self._conn.recv()
        except EOFError:  # it died before it could say why (killed, out of memory, a crash in native code)
            self.process.join(10)
            raise NotReady(f"the engine process exited (code {self.process.exitcode}) while loading the backbone") from None
        if message[0] == "failed":
            self.process.join(10)
            raise message[1]
        _, self.spec, self.encoder, self.backend, self.bank_bytes, generates = message
        if generates is not None:
            from server.generation.remote import RemoteScheduler

            tokenizer, context = generates
            self.generation = RemoteScheduler(self, tokenizer, context, self.settings.generation_slots,
                                              self.settings.generation_max_queued, self.retry_after_s)
        self._reader = threading.Thread(target=self._read, name="bitfit-engine-reader", daemon=True)
        self._reader.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        try:
            self._send(("stop", 0))
        except NotReady:
            pass
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout)
        self._fail_waiting(NotReady("the server is shutting down"))

    # -- commands (event loop side) --------------------------------------------------------------------

    async def submit(self, key: Hashable, items: Sequence[Item]) -> list:
        return await self.submit_many([(key, items)])

    async def submit_many(self, parts: Sequence[tuple[Hashable, Sequence[Item]]]) -> list:
        """As `Runner.submit_many`: every part in the same batch when it fits; one Result per item."""
        keys = [key for key, items in parts for _ in items]
        items = [x for _, part in parts for x in part]
        with self._lock:
            if self._queued + len(items) > self.max_queued:
                raise Overloaded(f"{self._queued} inputs are already waiting (limit {self.max_queued}); retry shortly",
                                 retry_after=self.retry_after_s)
            self._queued += len(items)
        try:
            encoded = self._encode(items)  # here, in the server's process: the engine process only pads and runs
            return await self._call("infer", keys, encoded, inputs=len(items))
        finally:
            with self._lock:
                self._queued -= len(items)

    def _encode(self, items):
        unique = list(dict.fromkeys(items))
        if len(unique) == len(items):
            return self.encoder.encode(items)
        by_item = dict(zip(unique, self.encoder.encode(unique)))
        return [by_item[x] for x in items]

    async def load(self, key: Hashable, bias_set: BiasSet) -> bool:
        return await self._call("load", key, bias_set.to_bytes())

    async def evict(self, key: Hashable) -> bool:
        return await self._call("evict", key)

    async def reserve(self, rows: int) -> None:
        await self._call("reserve", rows)

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Keep the engine idle between batches while the block runs (tests of backpressure)."""
        ident = next(self._ids)
        self._send(("hold", ident))
        try:
            yield
        finally:
            try:
                self._send(("release", 0, ident))
            except NotReady:
                pass  # the engine process is gone: there is nothing left to release

    def next_id(self) -> int:
        return next(self._ids)

    def send_message(self, message) -> None:
        """A message for the engine process (the generation scheduler's); NotReady if it is gone."""
        if self.failure is not None or self._stopping:
            raise NotReady(self.failure or "the server is shutting down")
        self._send(message)

    async def _call(self, kind: str, *args, inputs: int = 0):
        if self.failure is not None or self._stopping:
            raise NotReady(self.failure or "the server is shutting down")
        loop = asyncio.get_running_loop()
        future, ident = loop.create_future(), next(self._ids)
        self._waiting[ident] = (future, loop, inputs)
        try:
            self._send((kind, ident, *args))
        except BaseException:
            self._waiting.pop(ident, None)
            raise
        return await future

    def _send(self, message) -> None:
        with self._send_lock:
            try:
                self._conn.send(message)
            except (OSError, ValueError) as e:
                raise NotReady(f"the engine process is not running ({e})") from None

    # -- the reader thread -----------------------------------------------------------------------------

    def _read(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            if message[0] == "batch":
                if self.on_batch is not None:
                    self.on_batch(message[1], message[2])
                continue
            if message[0] == "gen":
                if self.generation is not None:
                    self.generation.deliver(message[1], message[2])
                continue
            _, ident, value, error, extra = message
            if extra is not None:
                self._note(ident, extra)
            waiting = self._waiting.pop(ident, None)
            if waiting is not None:
                future, loop, _ = waiting
                loop.call_soon_threadsafe(_settle, future, value, error)
        if not self._stopping:
            self._died()

    def _note(self, ident: int, extra) -> None:
        """What a bank change left resident, before its caller hears it is done."""
        key, info, self.bank_bytes = extra
        if key is None:
            return
        if info is None:
            self._resident.pop(key, None)
        else:
            self._resident[key] = info

    def _died(self) -> None:
        code = self.process.exitcode if hasattr(self, "process") else None
        self.failure = f"the engine process exited (code {code}); the server is stopping so that it can be restarted"
        log.error(self.failure)
        self._fail_waiting(NotReady(self.failure))
        os.kill(os.getpid(), signal.SIGTERM)  # uvicorn shuts down; Docker, Kubernetes or Ray start a new server

    def _fail_waiting(self, error: Exception) -> None:
        if self.generation is not None:
            self.generation.fail_all(error)
        waiting, self._waiting = self._waiting, {}
        for future, loop, _ in waiting.values():
            loop.call_soon_threadsafe(_settle, future, None, error)


def _settle(future: asyncio.Future, value=None, error: BaseException | None = None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)
