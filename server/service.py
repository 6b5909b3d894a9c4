"""Tasks as the HTTP layer sees them: names and versions over the store, the bank and the batcher.

The store is the truth (shared by every server process); this process keeps the active version of
each task resident, plus a few recently asked-for other versions (`?version=`). A change, made here
or by another process, is noticed through `store.generation()`, and only what changed is reloaded.
A new version is loaded onto the device before the active map points at it, so requests keep being
answered by the old version until the new one is ready, and never by half of either.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from pathlib import Path

from bias_store.errors import TaskNotFound
from bitfit.bias_set import read_metadata
from server.batcher import Batcher, Result
from server.errors import InvalidInput
from server.metrics import UNKNOWN_TASK, Metrics
from server.schemas import ClassPrediction, PredictResponse, RegressionPrediction, TaskList, TaskOut, VersionOut
from server.settings import Settings

log = logging.getLogger(__name__)
Key = tuple[str, str]  # (task, version)


def input_problems(inputs, settings: Settings) -> list[str]:
    """Everything over the limits in one /predict body; empty when fine."""
    problems = []
    if len(inputs) > settings.max_inputs:
        problems.append(f"{len(inputs)} inputs, over the limit of {settings.max_inputs} per request "
                        "(BITFIT_MAX_INPUTS): split the request")
    long = [i for i, x in enumerate(inputs) for t in ([x] if isinstance(x, str) else x) if len(t) > settings.max_text_chars]
    if long:
        problems.append(f"inputs {sorted(set(long))[:10]} have texts over {settings.max_text_chars} characters "
                        "(BITFIT_MAX_TEXT_CHARS)")
    return problems


def to_prediction(result: Result, labels: tuple[str, ...]) -> ClassPrediction | RegressionPrediction:
    if not labels:
        return RegressionPrediction(value=float(result.output[0]), truncated=result.truncated)
    probs = result.output.softmax(-1).tolist()
    best = max(range(len(probs)), key=probs.__getitem__)
    return ClassPrediction(label=labels[best], score=probs[best], scores=dict(zip(labels, probs)),
                           truncated=result.truncated)


def seed_store(store, seed_dir: Path) -> list[str]:
    """Store each shipped bias set whose task the store lacks; returns the tasks added."""
    added, have = [], set(store.active_versions())
    for path in sorted(Path(seed_dir).glob("*.safetensors")):
        data = path.read_bytes()
        task = read_metadata(data).get("task") or path.stem
        if task in have:
            continue
        try:
            store.put(task, data)
        except Exception as e:  # a seed for another backbone (--backbone) is skipped, not fatal
            log.warning("not seeding %s from %s: %s", task, path, e)
            continue
        added.append(task)
        have.add(task)
    return added


class TaskService:
    def __init__(self, store, batcher: Batcher, settings: Settings, metrics: Metrics):
        self.store, self.batcher, self.settings, self.metrics = store, batcher, settings, metrics
        self.bank = batcher.engine.bank
        self.active: dict[str, str] = {}  # task -> active version, as last read from the store
        self.labels: dict[Key, tuple[str, ...]] = {}  # resident keys -> their labels
        self.inactive: OrderedDict[Key, None] = OrderedDict()  # resident non-active keys, least recent first
        self.generation: int | None = None
        self.bank_bytes = 0  # as last reported by the worker
        self.ready = False
        self._lock = asyncio.Lock()  # one bank change at a time from the event loop

    # -- keeping up with the store ---------------------------------------------------------------------

    async def start(self) -> None:
        await self.sync(force=True)
        self.ready = True

    async def poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.poll_interval_s)
            try:
                await self.sync()
            except Exception:  # the poller must outlive a bad moment in the store
                log.exception("reading the store for changes failed")

    async def sync(self, force: bool = False) -> list[str]:
        """Load what changed in the store since last time; returns the tasks whose active version changed."""
        generation = await asyncio.to_thread(self.store.generation)  # read first: a later change re-triggers
        if generation == self.generation and not force:
            return []
        # the O(tasks) scan runs outside the lock, so an admin call's sync_task never queues behind it
        wanted = await asyncio.to_thread(self.store.active_versions)
        async with self._lock:
            now = await asyncio.to_thread(self.store.generation)
            if now != generation:  # the store changed during the scan: read it again, holding the lock (rare)
                generation, wanted = now, await asyncio.to_thread(self.store.active_versions)
            new = sum((task, version) not in self.labels for task, version in wanted.items())
            if new > 1:  # one reallocation for a whole store at start, not one per 1/8 growth
                await self.batcher.call(self._on_worker, self.bank.reserve, len(self.labels) + new)
            changed = [task for task in set(wanted) | set(self.active) if await self._apply(task, wanted.get(task))]
            await self._trim()
            self.generation = generation
            if changed:
                self.metrics.reloads.inc(len(changed))
                log.info("tasks changed in the store: %s", sorted(changed))
            return changed

    async def sync_task(self, task: str) -> bool:
        """Load just `task`'s active version after a change made through this process (O(1), not O(tasks)).

        The store generation is left alone: changes other processes made meanwhile still reach the
        next full sync."""
        async with self._lock:
            try:
                version = (await asyncio.to_thread(self.store.task, task)).active
            except TaskNotFound:
                version = None
            changed = await self._apply(task, version)
            await self._trim()
            if changed:
                self.metrics.reloads.inc()
                log.info("task changed in the store: %s", task)
            return changed

    async def _apply(self, task: str, version: str | None) -> bool:
        """Make `version` (None: no task) what answers `task`; the previous version stays resident, inactive."""
        previous = self.active.get(task)
        if previous == version:
            return False
        if version is None:
            for key in [k for k in self.labels if k[0] == task]:
                await self._evict(key)
            del self.active[task]
            return True
        try:
            await self._ensure((task, version))
        except Exception as e:  # keep serving the old version of this task
            log.error("cannot load %s version %s from the store: %s", task, version, e)
            return False
        self.active[task] = version
        self.inactive.pop((task, version), None)
        if previous is not None and (task, previous) in self.labels:
            self.inactive[(task, previous)] = None
        return True

    async def _ensure(self, key: Key) -> None:
        if key in self.labels:
            if key in self.inactive:
                self.inactive.move_to_end(key)
            return
        _, bias_set = await asyncio.to_thread(self.store.load, *key)
        nbytes = await self.batcher.call(self._on_worker, self.bank.load, key, bias_set)
        self.labels[key] = tuple(bias_set.labels)
        self._gauges(nbytes)

    async def _evict(self, key: Key) -> None:
        nbytes = await self.batcher.call(self._on_worker, self.bank.evict, key)
        self.labels.pop(key, None)
        self.inactive.pop(key, None)
        self._gauges(nbytes)

    async def _trim(self, keep: Key | None = None) -> None:
        while len(self.inactive) > self.settings.max_inactive:
            key = next(iter(self.inactive))
            if key == keep:
                break
            await self._evict(key)

    def _on_worker(self, change, *args) -> int:
        """A bank change, run by the batcher's worker between batches; returns the bank's bytes after it."""
        change(*args)
        return self.bank.nbytes

    def _gauges(self, bank_bytes: int) -> None:
        self.metrics.resident.set(len(self.labels))
        self.metrics.bank_bytes.set(bank_bytes)
        self.bank_bytes = bank_bytes

    # -- predict ---------------------------------------------------------------------------------------

    def metric_task(self, task: str | None) -> str:
        return task if task in self.active else UNKNOWN_TASK

    async def resolve(self, task: str, version: str | None) -> Key:
        """The resident key that answers `task` (at `version`, or its active one), loading it if needed."""
        if version is None:
            version = self.active.get(task)
            if version is None:
                await self.sync()  # another process may have added it a moment ago
                version = self.active.get(task)
            if version is None:
                raise TaskNotFound(task)
        key = (task, version)
        if key not in self.labels:
            async with self._lock:
                await self._ensure(key)
                if self.active.get(task) != version:
                    self.inactive[key] = None
                    await self._trim(keep=key)
        elif key in self.inactive:
            self.inactive.move_to_end(key)
        return key

    async def predict(self, task: str, version: str | None, inputs: list) -> PredictResponse:
        problems = input_problems(inputs, self.settings)
        if problems:
            raise InvalidInput("; ".join(problems))
        key = await self.resolve(task, version)
        labels = self.labels[key]
        self.metrics.inputs.labels(task).observe(len(inputs))
        results = await self.batcher.submit(key, [x if isinstance(x, str) else tuple(x) for x in inputs])
        return PredictResponse(task=task, version=key[1], predictions=[to_prediction(r, labels) for r in results])

    # -- admin -----------------------------------------------------------------------------------------

    async def put(self, task: str, data: bytes, activate: bool):
        info = await asyncio.to_thread(self.store.put, task, data, activate=activate)
        await self.sync_task(task)  # live before the 201 goes out
        return info

    async def activate(self, task: str, version: str):
        info = await asyncio.to_thread(self.store.activate, task, version)
        await self.sync_task(task)
        return info

    async def rollback(self, task: str):
        info = await asyncio.to_thread(self.store.rollback, task)
        await self.sync_task(task)
        return info

    async def delete_task(self, task: str) -> None:
        await asyncio.to_thread(self.store.delete_task, task)
        await self.sync_task(task)

    async def delete_version(self, task: str, version: str, force: bool) -> None:
        await asyncio.to_thread(self.store.delete_version, task, version, force=force)
        await self.sync_task(task)
        async with self._lock:
            if (task, version) in self.labels and self.active.get(task) != version:
                await self._evict((task, version))

    def _task_out(self, info) -> TaskOut:
        versions = [VersionOut(version=v.version, created_at=v.created_at, size=v.size, labels=list(v.labels),
                               metrics=dict(v.metrics), method=v.method, active=v.active,
                               resident=(info.name, v.version) in self.labels) for v in info.versions]
        return TaskOut(name=info.name, active=info.active, versions=versions)

    async def tasks(self) -> TaskList:
        infos = await asyncio.to_thread(self.store.tasks)
        return TaskList(tasks=[self._task_out(i) for i in infos])

    async def task(self, task: str) -> TaskOut:
        return self._task_out(await asyncio.to_thread(self.store.task, task))
