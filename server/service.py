"""Tasks as the HTTP layer sees them: names and versions over the store and the runner. Policy only.

The store is the truth (shared by every server process). The runner owns what is resident; this service decides
what should be: the active version of each task, plus a few recently asked-for other versions (`?version=`).
A change, made here or by another process, is noticed through `store.generation()`, and only what changed is
reloaded.

Acknowledged means live. An upload is stored inactive, loaded into the bank, and only then activated; if loading
fails the stored version is removed again and the error says why (422), the previous version still active and
answering. An activation loads its version before the store's pointer moves. Requests keep being answered by the
old version until the new one is resident, and never by half of either.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import OrderedDict
from pathlib import Path

from bias_store.errors import InvalidBiasSet, StoreUnavailable, TaskNotFound
from bitfit.bias_set import read_metadata
from server.errors import InvalidInput, UnknownTasks
from server.http.metrics import UNKNOWN_TASK, Metrics
from server.http.schemas import TaskList, TaskOut, VersionOut
from server.runtime.runner import Result, Runner
from server.settings import Settings

log = logging.getLogger(__name__)
Key = tuple[str, str]  # (task, version)
FORMS = {"text": 'single texts: {"inputs": ["text", ...]}', "pair": 'text pairs: {"inputs": [["text a", "text b"], ...]}'}


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


def kind_problem(task: str, expected: str | None, inputs) -> str | None:
    """Why these inputs are the wrong kind for the task (it records single texts or pairs), or None."""
    if expected is None or not inputs:
        return None
    given = "text" if isinstance(inputs[0], str) else "pair"
    if given == expected:
        return None
    return f"task {task!r} takes {FORMS[expected]}; this request sent {'single texts' if given == 'text' else 'text pairs'}"


def generation_problem(task: str, info) -> str | None:
    """Why a generation task cannot answer /predict (it writes text, it has no head), or None."""
    if info is None or not getattr(info, "generates", False):
        return None
    return (f"task {task!r} is a generation task (it writes text, it has no labels): ask it with "
            f"POST /v1/completions or /v1/chat/completions and model={task!r} (docs/generation.md)")


def softmax(logits: list[float]) -> list[float]:
    top = max(logits)
    exps = [math.exp(x - top) for x in logits]
    total = sum(exps)
    return [e / total for e in exps]


def to_prediction(result: Result, labels: tuple[str, ...]) -> dict:
    """One input's answer, shaped as `ClassPrediction` or `RegressionPrediction` (the HTTP contract).

    Plain dicts, serialised once: on the hot path, building and re-validating response models costs more per
    request than the model's share of a batch on a small CPU (docs/benchmarks.md)."""
    if not labels:
        return {"value": result.output[0], "truncated": result.truncated}
    probs = softmax(result.output)
    best = max(range(len(probs)), key=probs.__getitem__)
    return {"label": labels[best], "score": probs[best], "scores": dict(zip(labels, probs)),
            "truncated": result.truncated}


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
    def __init__(self, store, runner: Runner, settings: Settings, metrics: Metrics):
        self.store, self.runner, self.settings, self.metrics = store, runner, settings, metrics
        self.active: dict[str, str] = {}  # task -> active version, as last read from the store
        self.inactive: OrderedDict[Key, None] = OrderedDict()  # resident non-active keys, least recent first
        self.generation: int | None = None
        self.store_error: str | None = None  # why the store did not answer the last time it was asked
        self.ready = False
        self._lock = asyncio.Lock()  # one change of residency at a time from the event loop

    # -- keeping up with the store ---------------------------------------------------------------------

    async def start(self) -> None:
        await self.sync(force=True)
        self.ready = True

    async def poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.poll_interval_s)
            try:
                await self.sync()
            except StoreUnavailable:
                pass  # logged once by sync; /readyz says degraded until the store answers again
            except Exception:  # the poller must outlive a bad moment in the store
                log.exception("reading the store for changes failed")

    async def sync(self, force: bool = False) -> list[str]:
        """Load what changed in the store since last time; returns the tasks whose active version changed.

        One small read when nothing changed; the tasks the store's change feed names when something did; a scan
        of every task only at start, or when the feed cannot say (this replica was away too long)."""
        return await self._sync(force)

    async def _sync(self, force: bool) -> list[str]:
        if force or self.generation is None:
            generation, tasks = await self._call(self.store.generation), None
        else:
            generation, tasks = await self._call(self.store.changes_since, self.generation)
            if generation == self.generation:
                return []
        if tasks is not None:
            async with self._lock:
                changed = []
                for task in tasks:
                    try:
                        version = (await self._call(self.store.task, task)).active
                    except TaskNotFound:
                        version = None
                    if await self._apply(task, version):
                        changed.append(task)
                return await self._synced(generation, changed)
        # the O(tasks) scan runs outside the lock, so an admin call never queues behind it
        wanted = await self._call(self.store.active_versions)
        async with self._lock:
            now = await self._call(self.store.generation)
            if now != generation:  # the store changed during the scan: read it again, holding the lock (rare)
                generation, wanted = now, await self._call(self.store.active_versions)
            new = sum(self.runner.info(key) is None for key in wanted.items())
            if new > 1:  # one reallocation for a whole store at start, not one per 1/8 growth
                await self.runner.reserve(len(self.runner.resident()) + new)
            changed = [task for task in set(wanted) | set(self.active) if await self._apply(task, wanted.get(task))]
            return await self._synced(generation, changed)

    async def _synced(self, generation: int, changed: list[str]) -> list[str]:
        await self._trim()
        self.generation = generation
        if changed:
            self.metrics.reloads.inc(len(changed))
            log.info("tasks changed in the store: %s", sorted(changed))
        self._gauges()
        return changed

    async def _call(self, fn, *args, **kwargs):
        """A store call off the event loop; a store that does not answer is noted for /readyz, then raised (503)."""
        try:
            value = await asyncio.to_thread(fn, *args, **kwargs)
        except StoreUnavailable as e:
            self._store_down(e)
            raise
        self.store_error = None
        return value

    def _store_down(self, error: Exception) -> None:
        if self.store_error is None:
            log.error("the store is unavailable; serving the resident tasks until it is back: %s", error)
        self.store_error = str(error)

    async def sync_task(self, task: str) -> bool:
        """Load just `task`'s active version (O(1), not O(tasks)). The store generation is left alone:
        changes other processes made meanwhile still reach the next full sync."""
        async with self._lock:
            try:
                version = (await self._call(self.store.task, task)).active
            except TaskNotFound:
                version = None
            return await self._apply_and_trim(task, version)

    async def _apply_and_trim(self, task: str, version: str | None) -> bool:
        changed = await self._apply(task, version)
        await self._trim()
        if changed:
            self.metrics.reloads.inc()
            log.info("task changed in the store: %s", task)
        self._gauges()
        return changed

    async def _apply(self, task: str, version: str | None) -> bool:
        """Make `version` (None: no task) what answers `task`; the previous version stays resident, inactive."""
        previous = self.active.get(task)
        if previous == version:
            return False
        if version is None:
            for key in [k for k in self.runner.resident() if k[0] == task]:
                await self._evict(key)
            del self.active[task]
            return True
        try:
            await self._ensure((task, version))
        except Exception as e:  # keep serving the old version of this task
            log.error("cannot load %s version %s from the store: %s", task, version, e)
            return False
        self._set_active(task, version)
        return True

    def _set_active(self, task: str, version: str) -> None:
        previous = self.active.get(task)
        self.active[task] = version
        self.inactive.pop((task, version), None)
        if previous is not None and previous != version and self.runner.info((task, previous)) is not None:
            self.inactive[(task, previous)] = None

    async def _ensure(self, key: Key) -> None:
        if self.runner.info(key) is not None:
            if key in self.inactive:
                self.inactive.move_to_end(key)
            return
        _, bias_set = await self._call(self.store.load, *key)
        await self.runner.load(key, bias_set)

    async def _evict(self, key: Key) -> None:
        await self.runner.evict(key)
        self.inactive.pop(key, None)

    async def _trim(self, keep: Key | None = None) -> None:
        while len(self.inactive) > self.settings.max_inactive:
            key = next(iter(self.inactive))
            if key == keep:
                break
            await self._evict(key)

    def _gauges(self) -> None:
        self.metrics.resident.set(len(self.runner.resident()))
        self.metrics.bank_bytes.set(self.runner.bank_bytes)

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
        if self.runner.info(key) is None:
            async with self._lock:
                await self._ensure(key)
                if self.active.get(task) != version:
                    self.inactive[key] = None
                    await self._trim(keep=key)
                self._gauges()
        elif key in self.inactive:
            self.inactive.move_to_end(key)
        return key

    async def predict(self, task: str, version: str | None, inputs: list) -> dict:
        """The answer to one /predict request, shaped as `PredictResponse`."""
        problems = input_problems(inputs, self.settings)
        if problems:
            raise InvalidInput("; ".join(problems))
        key = await self.resolve(task, version)
        info = self.runner.info(key)
        problem = generation_problem(task, info) or kind_problem(task, info.input_kind if info else None, inputs)
        if problem:
            raise InvalidInput(problem)
        self.metrics.inputs.labels(task).observe(len(inputs))
        results = await self.runner.submit(key, [x if isinstance(x, str) else tuple(x) for x in inputs])
        return {"task": task, "version": key[1], "predictions": [to_prediction(r, info.labels) for r in results]}

    async def fanout(self, tasks: list[str], inputs: list) -> dict:
        """Every task's answer to the same inputs, shaped as `FanoutResponse`: one row per task and input, all in
        one batch, so one gather forward when they fit the token budget too (`Runner.submit_many`)."""
        problems = input_problems(inputs, self.settings)
        rows, limit = len(tasks) * len(inputs), self.runner.max_batch
        if rows > limit:
            problems.append(f"{len(tasks)} tasks x {len(inputs)} inputs = {rows} rows, over the batch limit of {limit} "
                            "(BITFIT_MAX_BATCH): ask fewer tasks or send fewer inputs per call")
        if problems:
            raise InvalidInput("; ".join(problems))
        missing = [t for t in dict.fromkeys(tasks) if t not in self.active]
        if missing:
            await self.sync()  # another process may have added them a moment ago
            missing = [t for t in missing if t not in self.active]
            if missing:
                raise UnknownTasks(missing)
        keys = [await self.resolve(t, None) for t in tasks]
        infos = [self.runner.info(k) for k in keys]
        kinds: dict[str, list[str]] = {}
        for t, info in zip(tasks, infos):
            if info is not None and info.input_kind is not None:
                kinds.setdefault(info.input_kind, []).append(t)
        if len(kinds) > 1:
            raise InvalidInput("these tasks take different inputs, so one call cannot serve them: "
                               + "; ".join(f"{', '.join(ts)} take{'s' if len(ts) == 1 else ''} {FORMS[k]}"
                                           for k, ts in kinds.items()) + "; ask them in separate calls")
        for t, info in zip(tasks, infos):
            if problem := generation_problem(t, info) or kind_problem(t, info.input_kind if info else None, inputs):
                raise InvalidInput(problem)
        items = [x if isinstance(x, str) else tuple(x) for x in inputs]
        results = await self.runner.submit_many([(k, items) for k in keys])
        n, out = len(items), []
        for i, (t, k, info) in enumerate(zip(tasks, keys, infos)):
            self.metrics.inputs.labels(t).observe(n)
            out.append({"task": t, "version": k[1],
                        "predictions": [to_prediction(r, info.labels) for r in results[i * n : (i + 1) * n]]})
        return {"results": out}

    # -- audit: who changed what, in the store (durable, shared by every server process) ------------------

    async def _audit(self, action: str, task: str, version: str | None, actor: dict | None, **extra) -> None:
        """Append a change already made; a failed append is logged with the record and counted, not raised."""
        record = {"action": action, "task": task, "version": version, "token": (actor or {}).get("token"),
                  "client": (actor or {}).get("client"), **extra}
        try:
            await self._call(self.store.append_audit, record)
        except Exception:
            self.metrics.audit_errors.inc()
            log.exception("the audit record of an admin change could not be stored: %s", record)

    async def audit(self, task: str | None = None, limit: int = 100) -> list[dict]:
        return await self._call(self.store.audit, task, limit)

    # -- admin: each change is live before it is answered -----------------------------------------------

    async def put(self, task: str, data: bytes, activate: bool, actor: dict | None = None):
        info = await self._put(task, data, activate)
        await self._audit("upload", task, info.version, actor, activated=activate)
        return info

    async def _put(self, task: str, data: bytes, activate: bool):
        async with self._lock:
            before = await self._call(self._versions, task)
            info = await self._call(self.store.put, task, data, activate=False)
            key = (task, info.version)
            try:
                await self._ensure(key)
            except Exception as e:  # refused by the bank: take back what this call stored, keep the rest as it was
                if info.version not in before:
                    await self._call(self.store.delete_version, task, info.version, force=True)
                raise InvalidBiasSet([f"the bias set was stored but could not be loaded, so it was removed: {e}"]) from e
            if activate:
                info = await self._call(self.store.activate, task, info.version)
                self._set_active(task, info.version)
            elif self.active.get(task) != info.version:
                self.inactive[key] = None
            await self._trim(keep=key)
            self._gauges()
            return info

    def _versions(self, task: str) -> set[str]:
        try:
            return {v.version for v in self.store.task(task).versions}
        except TaskNotFound:
            return set()

    async def activate(self, task: str, version: str, actor: dict | None = None):
        async with self._lock:
            await self._ensure((task, version))  # unknown versions raise VersionNotFound here, before any change
            info = await self._call(self.store.activate, task, version)
            self._set_active(task, version)
            await self._trim()
            self._gauges()
        await self._audit("activate", task, version, actor)
        return info

    async def rollback(self, task: str, actor: dict | None = None):
        info = await self._call(self.store.rollback, task)
        await self.sync_task(task)
        await self._audit("rollback", task, info.version, actor)
        return info

    async def delete_task(self, task: str, actor: dict | None = None) -> None:
        await self._call(self.store.delete_task, task)
        await self.sync_task(task)
        await self._audit("delete_task", task, None, actor)

    async def delete_version(self, task: str, version: str, force: bool, actor: dict | None = None) -> None:
        await self._call(self.store.delete_version, task, version, force=force)
        await self.sync_task(task)
        async with self._lock:
            if self.runner.info((task, version)) is not None and self.active.get(task) != version:
                await self._evict((task, version))
            self._gauges()
        await self._audit("delete_version", task, version, actor, force=force)

    def _task_out(self, info) -> TaskOut:
        versions = [VersionOut(version=v.version, created_at=v.created_at, size=v.size, labels=list(v.labels),
                               metrics=dict(v.metrics), method=v.method, active=v.active,
                               resident=self.runner.info((info.name, v.version)) is not None) for v in info.versions]
        return TaskOut(name=info.name, active=info.active, versions=versions)

    async def tasks(self) -> TaskList:
        infos = await self._call(self.store.tasks)
        return TaskList(tasks=[self._task_out(i) for i in infos])

    async def task(self, task: str) -> TaskOut:
        return self._task_out(await self._call(self.store.task, task))
