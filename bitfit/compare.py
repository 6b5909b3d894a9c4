"""Comparing training methods on GLUE: a plan of runs, each in a fresh process, with a resumable results file.

One run is one (method, task, learning rate, seed), in one of two stages. A *final* run trains on the
task's train split and is scored on dev. Where the settings hold out a share of train
(`select_share > 0`), *selection* runs first train on the rest of train at each learning rate of the
method's grid and are scored on the held-out slice; the best of them fixes the final runs' learning rate,
so dev chooses nothing. Without a held-out share, every grid value runs as a final run and the summary
picks the best on dev, as the BitFit paper did.

The parent process only plans and records: every run trains in a child (`python -m bitfit.compare_child
SPEC`, which see), so its peak RSS is its own (VmHWM, reset before training where the kernel allows). After
each run the results file (JSON) is rewritten atomically, so an interrupted comparison resumes where it
stopped. The summary (`bitfit.compare_summary`) turns the file into scores with standard errors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from bitfit.errors import BitfitError
from bitfit.files import write_atomic

# GLUE folder per task key, in the order tables list them
TASKS = {"sst2": "SST-2", "mrpc": "MRPC", "rte": "RTE", "cola": "CoLA", "stsb": "STS-B"}
METHOD_ORDER = ("full", "bitfit", "bq-bm2", "lora", "ia3", "random", "head")
RESULTS_FORMAT = "bitfit-compare-results"


@dataclass(frozen=True)
class Settings:
    """Everything that makes two runs of one (method, task, lr, seed) comparable."""

    epochs: int = 3
    max_train: int | None = None  # fixed random subset of the train split (None: all of it)
    max_dev: int | None = None  # fixed random subset of the dev split
    batch_size: int = 32
    max_length: int = 128  # tokens per input (pairs share it)
    seed: int = 0
    threads: int = 1  # torch threads per run, so other work keeps the other cores
    keep: str = "best"  # the epoch a final run reports: "best" on dev, or "last" (dev chooses nothing)
    select_share: float = 0.0  # > 0: this share of train is held out to choose learning rates on (not dev)
    select_train: int | None = None  # training examples of a selection run, drawn from the rest of train
    select_dev: int | None = None  # held-out examples a selection run is scored on
    select_epochs: int = 1


QUICK = Settings(epochs=1, max_train=256, max_dev=160, batch_size=16, max_length=64)  # ~20 min on 1 busy core
# what fits a working session on 2 CPU cores: 189 steps a run; dev sets whole but CoLA's and STS-B's (1,000 of 1,043 / 1,500)
MEDIUM = Settings(epochs=3, max_train=1000, max_dev=1000, batch_size=16, max_length=128)
# whole train splits but SST-2's (20,000 of 67,349), whole dev splits, 3 epochs, the last epoch reported; learning rates
# chosen by one epoch on 1,000 examples of train, scored on a held-out 10 % of train (at most 1,000 examples): short
# runs, because the final runs alone cost about 14 CPU hours (docs/comparison.md, "Compute plan")
FULL = Settings(epochs=3, max_train=20_000, batch_size=32, max_length=128, keep="last",
                select_share=0.1, select_train=1000, select_dev=1000, select_epochs=1)
# step time and peak memory, side by side: 20 steps of the same batches for every method, default learning rates
COSTS = Settings(epochs=1, max_train=640, max_dev=64, batch_size=32, max_length=128)
PRESETS = {"quick": QUICK, "medium": MEDIUM, "full": FULL, "costs": COSTS}

# 189 steps need larger learning rates than each method's default (tuned for full train splits); the first is tried first
MEDIUM_GRIDS = {"full": (5e-5, 1e-4), "bitfit": (5e-3, 2e-3, 1e-2), "bq-bm2": (5e-3, 1e-2), "random": (5e-3, 1e-2),
                "lora": (1e-3, 5e-4), "ia3": (1e-2, 3e-3), "head": (1e-2, 3e-2)}
# the full preset's two candidates per method, chosen between on the held-out slice of train
FULL_GRIDS = {"full": (5e-5, 1e-4), "bitfit": (2e-3, 5e-3), "bq-bm2": (2e-3, 5e-3), "random": (2e-3, 5e-3),
              "lora": (5e-4, 1e-3), "ia3": (3e-3, 1e-2), "head": (2e-3, 1e-2)}
PRESET_GRIDS = {"medium": MEDIUM_GRIDS, "full": FULL_GRIDS}
# two seeds where dev sets are smallest and runs vary most
PRESET_SEEDS = {"full": {"rte": 2, "mrpc": 2}}


@dataclass(frozen=True)
class RunSpec:
    method: str
    task: str
    lr: float
    settings: Settings
    glue_dir: str
    backbone: str | None = None  # None: the packaged MiniLM
    seed: int | None = None  # None: the settings' seed
    stage: str = "final"  # or "select": trained on train less the held-out slice, scored on that slice
    device: str = "cpu"

    @property
    def run_seed(self) -> int:
        return self.settings.seed if self.seed is None else self.seed

    @property
    def key(self) -> str:
        return run_key(self.method, self.task, self.lr, self.seed, self.stage)


def run_key(method: str, task: str, lr: float, seed: int | None = None, stage: str = "final") -> str:
    key = f"{method}/{task}/{lr:g}" + ("" if seed is None else f"/seed{seed}")
    return key if stage == "final" else f"{stage}/{key}"


def chosen_lr(entries: list[dict]) -> float:
    """The learning rate of the best-scoring run (ties: the smaller learning rate)."""
    return max(entries, key=lambda e: (e["score"], -e["lr"]))["lr"]


@dataclass(frozen=True)
class Plan:
    """Which runs a comparison holds; `runs(results)` lists them, the finals once their learning rate is known."""

    methods: tuple[str, ...]
    tasks: tuple[str, ...]
    lrs: dict[str, tuple[float, ...]]  # per method, the first tried first
    settings: Settings
    glue_dir: str
    backbone: str | None = None
    seeds: dict[str, int] = field(default_factory=dict)  # per task, how many seeds (default 1)
    device: str = "cpu"

    def spec(self, method: str, task: str, lr: float, seed: int | None = None, stage: str = "final") -> RunSpec:
        return RunSpec(method, task, lr, self.settings, self.glue_dir, self.backbone,
                       None if seed in (None, self.settings.seed) else seed, stage, self.device)

    def task_seeds(self, task: str) -> list[int]:
        return [self.settings.seed + i for i in range(self.seeds.get(task, 1))]

    def runs(self, results: dict | None = None) -> list[RunSpec]:
        if self.settings.select_share > 0:
            return self._runs_selected(results or {})
        # on dev: every grid value is a final run; rounds (every first lr, then the second, ...) fill the table early
        rounds = max(len(v) for v in self.lrs.values())
        first, extra = [], []
        for i in range(rounds):
            for task in self.tasks:
                for m in self.methods:
                    if i < len(self.lrs[m]):
                        seeds = self.task_seeds(task)
                        first.append(self.spec(m, task, self.lrs[m][i], seeds[0]))
                        extra += [self.spec(m, task, self.lrs[m][i], s) for s in seeds[1:]]
        return first + extra

    def _runs_selected(self, results: dict) -> list[RunSpec]:
        done = results.get("runs", {})
        out, extra = [], []
        for task in self.tasks:
            finals = []
            rounds = max(len(self.lrs[m]) for m in self.methods)
            out += [self.spec(m, task, self.lrs[m][i], stage="select")
                    for i in range(rounds) for m in self.methods if len(self.lrs[m]) > 1 and i < len(self.lrs[m])]
            for m in self.methods:
                grid = self.lrs[m]
                if len(grid) == 1:
                    lr = grid[0]
                else:
                    scored = [done.get(self.spec(m, task, v, stage="select").key) for v in grid]
                    if any(e is None for e in scored):
                        continue  # its final waits for the selection runs
                    lr = chosen_lr(scored)
                seeds = self.task_seeds(task)
                finals.append(self.spec(m, task, lr, seeds[0]))
                extra += [self.spec(m, task, lr, s) for s in seeds[1:]]
            out += finals
        return out + extra  # extra seeds last: the one-seed table fills first


def make_plan(methods: list[str], tasks: list[str], lrs: str | list[float], settings: Settings, glue_dir, backbone=None,
              grids: dict[str, tuple[float, ...]] | None = None, seeds: dict[str, int] | None = None,
              device: str = "cpu") -> Plan:
    """`lrs` is "default" (each method's own), "grid" (each method's grid), or explicit values for every method.

    `grids` replaces methods' grids (and defaults: a grid's first value) for a preset."""
    from bitfit.methods import get_method

    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise BitfitError(f"unknown task(s) {unknown}; choose from {list(TASKS)}")
    missing = [TASKS[t] for t in tasks if not (Path(glue_dir) / TASKS[t] / "train.tsv").is_file()]
    if missing:
        raise BitfitError(f"GLUE data for {missing} not found under {glue_dir}")
    bad_seeds = {t: n for t, n in (seeds or {}).items() if t not in TASKS or n < 1}
    if bad_seeds:
        raise BitfitError(f"seeds {bad_seeds}: each needs a known task and at least 1 seed")
    per_method = {}
    for name in methods:
        m = get_method(name)
        grid = (grids or {}).get(name) or m.grid or (m.lr,)
        first = grid[0] if grids and name in grids else m.lr
        values = [first] if lrs == "default" else list(grid) if lrs == "grid" else list(lrs)
        per_method[name] = tuple(sorted(set(values), key=lambda v: (v != first, values.index(v))))  # the default first
    return Plan(tuple(methods), tuple(tasks), per_method, settings, str(glue_dir), backbone,
                {t: n for t, n in (seeds or {}).items() if t in tasks}, device)


def plan(methods, tasks, lrs, settings, glue_dir, backbone=None, grids=None, seeds=None, device="cpu") -> list[RunSpec]:
    """The runs known before any has run (with selection: the selection runs and the finals that need none)."""
    return make_plan(methods, tasks, lrs, settings, glue_dir, backbone, grids, seeds, device).runs({})


# ---------------------------------------------------------------------------------------------
# The results file


def _comparable(settings: dict) -> dict:
    """A stored settings dict with the fields added since it was written set to their (then implied) defaults."""
    return asdict(Settings()) | settings


def load_results(path: Path, settings: Settings) -> dict:
    """The results so far; a file made with other settings is refused rather than mixed in."""
    if not path.exists():
        return {"format": RESULTS_FORMAT, "version": 1, "settings": asdict(settings), "runs": {}, "failed": {}}
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BitfitError(f"{path} is not a results file ({e})") from None
    if results.get("format") != RESULTS_FORMAT:
        raise BitfitError(f"{path} is not a {RESULTS_FORMAT} file")
    if _comparable(results["settings"]) != asdict(settings):
        raise BitfitError(f"{path} holds runs made with settings {results['settings']}, not {asdict(settings)}; "
                          "pass another --results file, or the same settings to resume")
    return results


def save_results(results: dict, path: Path) -> None:
    write_atomic(path, json.dumps(results, indent=1, sort_keys=True).encode())


def run_all(runs: list[RunSpec] | Plan, path: Path, log_path: Path | None = None, timeout: float | None = None,
            echo=print, jobs: int = 1, settings: Settings | None = None) -> dict:
    """Do every run the results file lacks, `jobs` child processes at a time; returns the results.

    `runs` is a fixed list, or a Plan, asked again after every run (a finished selection makes finals
    known). Each finished run is saved at once (atomically), so killing the parent loses only the runs in
    flight; a run that fails is recorded and not retried until the next invocation. With jobs > 1 the
    runs share the machine, so their step times are not a cost measurement (use the costs preset).
    """
    planner: Callable[[dict], list[RunSpec]] = runs.runs if isinstance(runs, Plan) else (lambda _r, fixed=list(runs): fixed)
    settings = settings or (runs.settings if isinstance(runs, Plan) else runs[0].settings if runs else Settings())
    results = load_results(path, settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    cond = threading.Condition()  # guards results, the file and the sets below
    in_flight: set[str] = set()
    attempted: set[str] = set()
    start, finished = time.perf_counter(), 0

    def todo() -> list[RunSpec]:
        return [r for r in planner(results) if r.key not in results["runs"] and r.key not in attempted]

    known = todo()
    echo(f"{len(planner(results)) - len(known)} runs already in {path}; {len(known)} to do now"
         + (" (finals follow their learning-rate selection)" if settings.select_share > 0 else "")
         + (f", {jobs} at a time" if jobs > 1 else ""))

    def record(spec: RunSpec, entry: dict | None, error: BitfitError | None, seconds: float) -> None:
        nonlocal finished
        finished += 1
        if error is None:
            results["runs"][spec.key] = entry
            results["failed"].pop(spec.key, None)
        else:
            results["failed"][spec.key] = {"error": str(error), "at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        save_results(results, path)
        left = len(todo()) + len(in_flight) - 1
        if error is not None:
            echo(f"[{finished} done, {left} left] {spec.key}: FAILED: {error}")
            return
        elapsed = time.perf_counter() - start
        echo(f"[{finished} done, {left} left] {spec.key}: {entry['metric']}={100 * entry['score']:.2f} "
             f"step {entry['step_seconds']:.3f} s, peak RSS {entry['peak_rss'] / 2**20:.0f} MiB, {seconds:.0f} s "
             f"(total {elapsed:.0f} s, about {elapsed / finished * left / 60:.0f} min to go at this pace)")

    def worker() -> None:
        while True:
            with cond:
                while True:
                    ready = todo()
                    if ready:
                        spec = ready[0]
                        attempted.add(spec.key)
                        in_flight.add(spec.key)
                        break
                    if not in_flight:
                        cond.notify_all()
                        return
                    cond.wait()  # a run in flight may make finals known
            t0 = time.perf_counter()
            try:
                entry, error = run_in_child(spec, log_path, timeout), None
            except BitfitError as e:
                entry, error = None, e
            with cond:
                record(spec, entry, error, time.perf_counter() - t0)
                in_flight.discard(spec.key)
                cond.notify_all()

    if jobs <= 1:  # in this thread, so Ctrl-C reaches subprocess.run and stops the child at once
        worker()
    else:
        threads = [threading.Thread(target=worker, daemon=True) for _ in range(jobs)]  # they only wait on children
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return results


# ---------------------------------------------------------------------------------------------
# One run, in a child process


CHILD_MARK = "BITFIT-COMPARE-RESULT "
CHILD_ERROR = "BITFIT-COMPARE-ERROR "


def run_in_child(spec: RunSpec, log_path: Path | None = None, timeout: float | None = None) -> dict:
    threads = str(spec.settings.threads)
    env = os.environ | {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false"}
    payload = json.dumps(asdict(spec))
    cmd = [sys.executable, "-m", "bitfit.compare_child", payload]
    log = open(log_path, "a") if log_path else subprocess.DEVNULL
    try:
        if log_path:
            log.write(f"\n=== {spec.key} {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
            log.flush()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BitfitError(f"run exceeded {timeout} s") from None
    finally:
        if log_path:
            log.close()
    out = proc.stdout.splitlines()
    errors = [ln[len(CHILD_ERROR):] for ln in out if ln.startswith(CHILD_ERROR)]
    if errors:
        raise BitfitError(errors[-1])
    lines = [ln for ln in out if ln.startswith(CHILD_MARK)]
    if proc.returncode != 0 or not lines:
        tail = proc.stdout.strip().splitlines()[-3:]
        raise BitfitError(f"child exited with {proc.returncode} ({' | '.join(tail)}); see {log_path or 'its stderr'}")
    return json.loads(lines[-1][len(CHILD_MARK):])


def with_overrides(settings: Settings, **overrides) -> Settings:
    return replace(settings, **{k: v for k, v in overrides.items() if v is not None})
