"""Comparing training methods on GLUE: a grid of runs, each in a fresh process, with a resumable results file.

One run is one (method, task, learning rate). The parent process only plans and records: every run
trains in a child (`python -m bitfit.compare --child SPEC`), so its peak RSS is its own, read by the
child from /proc/self/status (VmHWM, reset before training where the kernel allows). After each run the
results file (JSON) is rewritten atomically, so an interrupted comparison resumes where it stopped.
`summarise` picks each method's best learning rate per task on dev and computes the averages.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from bitfit.errors import BitfitError
from bitfit.files import write_atomic

# GLUE folder per task key, in the order tables list them
TASKS = {"sst2": "SST-2", "mrpc": "MRPC", "rte": "RTE", "cola": "CoLA", "stsb": "STS-B"}
METHOD_ORDER = ("full", "bitfit", "bq-bm2", "lora", "random", "head")
RESULTS_FORMAT = "bitfit-compare-results"


@dataclass(frozen=True)
class Settings:
    """Everything that makes two runs of one (method, task, lr) comparable."""

    epochs: int = 3
    max_train: int | None = None  # fixed random subset of the train split (None: all of it)
    max_dev: int | None = None  # fixed random subset of the dev split
    batch_size: int = 32
    max_length: int = 128  # tokens per input (pairs share it)
    seed: int = 0
    threads: int = 1  # torch threads per run, so other work keeps the other cores


FULL = Settings()
QUICK = Settings(epochs=1, max_train=256, max_dev=160, batch_size=16, max_length=64)  # ~20 min on 1 busy core
# what fits a working session on 2 CPU cores: 189 steps a run; dev sets whole but CoLA's and STS-B's (1,000 of 1,043 / 1,500)
MEDIUM = Settings(epochs=3, max_train=1000, max_dev=1000, batch_size=16, max_length=128)
PRESETS = {"quick": QUICK, "medium": MEDIUM, "full": FULL}

# 189 steps need larger learning rates than each method's default (tuned for full train splits); the first is tried first
MEDIUM_GRIDS = {"full": (5e-5, 1e-4), "bitfit": (5e-3, 2e-3, 1e-2), "bq-bm2": (5e-3, 1e-2), "random": (5e-3, 1e-2),
                "lora": (1e-3, 5e-4), "head": (1e-2, 3e-2)}


@dataclass(frozen=True)
class RunSpec:
    method: str
    task: str
    lr: float
    settings: Settings
    glue_dir: str
    backbone: str | None = None  # None: the packaged MiniLM

    @property
    def key(self) -> str:
        return run_key(self.method, self.task, self.lr)


def run_key(method: str, task: str, lr: float) -> str:
    return f"{method}/{task}/{lr:g}"


def plan(methods: list[str], tasks: list[str], lrs: str | list[float], settings: Settings, glue_dir, backbone=None,
         grids: dict[str, tuple[float, ...]] | None = None) -> list[RunSpec]:
    """The runs to do, default learning rates first, so that a partial results file already fills the table.

    `lrs` is "default" (each method's own), "grid" (each method's grid), or explicit values for every method.
    `grids` replaces methods' grids (and defaults: a grid's first value) for a preset.
    """
    from bitfit.methods import get_method

    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise BitfitError(f"unknown task(s) {unknown}; choose from {list(TASKS)}")
    missing = [TASKS[t] for t in tasks if not (Path(glue_dir) / TASKS[t] / "train.tsv").is_file()]
    if missing:
        raise BitfitError(f"GLUE data for {missing} not found under {glue_dir}")
    per_method = {}
    for name in methods:
        m = get_method(name)
        grid = (grids or {}).get(name) or m.grid or (m.lr,)
        first = grid[0] if grids and name in grids else m.lr
        values = [first] if lrs == "default" else list(grid) if lrs == "grid" else list(lrs)
        per_method[name] = sorted(set(values), key=lambda v: (v != first, values.index(v)))  # the default first
    rounds = max(len(v) for v in per_method.values())
    runs = []
    for i in range(rounds):
        for task in tasks:
            for name in methods:
                if i < len(per_method[name]):
                    runs.append(RunSpec(name, task, per_method[name][i], settings, str(glue_dir), backbone))
    return runs


# ---------------------------------------------------------------------------------------------
# The results file


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
    if results["settings"] != asdict(settings):
        raise BitfitError(f"{path} holds runs made with settings {results['settings']}, not {asdict(settings)}; "
                          "pass another --results file, or the same settings to resume")
    return results


def save_results(results: dict, path: Path) -> None:
    write_atomic(path, json.dumps(results, indent=1, sort_keys=True).encode())


def run_all(runs: list[RunSpec], path: Path, log_path: Path | None = None, timeout: float | None = None, echo=print,
            jobs: int = 1) -> dict:
    """Do every run the results file lacks, `jobs` child processes at a time; returns the results.

    Each finished run is saved at once (atomically), so killing the parent loses only the runs in flight.
    With jobs > 1 the runs share the machine, so their step times are comparable with each other only if
    the machine has a core per job.
    """
    settings = runs[0].settings if runs else FULL
    results = load_results(path, settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    todo = [r for r in runs if r.key not in results["runs"]]
    echo(f"{len(runs) - len(todo)} of {len(runs)} runs already in {path}; {len(todo)} to do" +
         (f", {jobs} at a time" if jobs > 1 else ""))
    start = time.perf_counter()
    lock = threading.Lock()  # one writer of `results` and the file
    finished = 0

    def one(spec: RunSpec) -> None:
        nonlocal finished
        t0 = time.perf_counter()
        try:
            entry, error = run_in_child(spec, log_path, timeout), None
        except BitfitError as e:
            entry, error = None, e
        with lock:
            finished += 1
            if error is None:
                results["runs"][spec.key] = entry
                results["failed"].pop(spec.key, None)
            else:
                results["failed"][spec.key] = {"error": str(error), "at": time.strftime("%Y-%m-%dT%H:%M:%S")}
            save_results(results, path)
            if error is not None:
                echo(f"[{finished}/{len(todo)}] {spec.key}: FAILED: {error}")
                return
            elapsed = time.perf_counter() - start
            echo(f"[{finished}/{len(todo)}] {spec.key}: {entry['metric']}={100 * entry['score']:.2f} "
                 f"step {entry['step_seconds']:.3f} s, peak RSS {entry['peak_rss'] / 2**20:.0f} MiB, "
                 f"{time.perf_counter() - t0:.0f} s (total {elapsed:.0f} s, "
                 f"about {elapsed / finished * (len(todo) - finished) / 60:.0f} min to go)")

    if jobs <= 1:  # in this thread, so Ctrl-C reaches subprocess.run and stops the child at once
        for spec in todo:
            one(spec)
    else:
        with ThreadPoolExecutor(jobs) as pool:  # threads only wait on child processes
            list(pool.map(one, todo))
    return results


# ---------------------------------------------------------------------------------------------
# One run, in a child process


CHILD_MARK = "BITFIT-COMPARE-RESULT "


def run_in_child(spec: RunSpec, log_path: Path | None = None, timeout: float | None = None) -> dict:
    threads = str(spec.settings.threads)
    env = os.environ | {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false"}
    payload = json.dumps(asdict(spec))
    cmd = [sys.executable, "-m", "bitfit.compare", "--child", payload]
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
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(CHILD_MARK)]
    if proc.returncode != 0 or not lines:
        tail = proc.stdout.strip().splitlines()[-3:]
        raise BitfitError(f"child exited with {proc.returncode} ({' | '.join(tail)}); see {log_path or 'its stderr'}")
    return json.loads(lines[-1][len(CHILD_MARK):])


def proc_status(field: str) -> int | None:
    """A memory field of /proc/self/status in bytes (Linux), else None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS, so the peak read later is training's own (Linux ≥ 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure(spec: RunSpec) -> dict:
    """Train one run in this process and return its results entry."""
    import resource

    import torch

    from bitfit.backbone import load_backbone
    from bitfit.data import load_task
    from bitfit.methods import get_method, trainable_scalars
    from bitfit.train import TrainConfig, train

    s = spec.settings
    torch.set_num_threads(s.threads)
    data = load_task(Path(spec.glue_dir) / TASKS[spec.task])
    backbone = load_backbone(spec.backbone, max_length=s.max_length)
    n_out = 1 if data.spec.is_regression else len(data.spec.labels)
    total = sum(p.numel() for p in backbone.model.parameters()) + (backbone.hidden_size + 1) * n_out  # before adapters
    rss_before = proc_status("VmRSS")
    peak_scope = "training" if reset_peak_rss() else "process"
    config = TrainConfig(method=spec.method, epochs=s.epochs, lr=spec.lr, batch_size=s.batch_size, seed=s.seed,
                         max_train=s.max_train, max_dev=s.max_dev, threads=s.threads)
    result = train(backbone, data, config)
    peak = proc_status("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    metrics = {k: v for k, v in result.metrics.items() if k not in ("epoch", "seconds")}
    trainable = trainable_scalars(result.model)
    return {
        "method": spec.method,
        "task": spec.task,
        "lr": spec.lr,
        "backbone": spec.backbone or "packaged all-MiniLM-L6-v2",
        "servable": get_method(spec.method).servable,
        "metric": data.spec.metric,
        "score": metrics[data.spec.metric],
        "metrics": metrics,
        "best_epoch": result.best_epoch,
        "history": result.history,
        "trainable": trainable,
        "total": total,
        "share": trainable / total,
        "train_examples": min(len(data.train), s.max_train or len(data.train)),
        "dev_examples": min(len(data.dev), s.max_dev or len(data.dev)),
        "steps": result.steps,
        "step_seconds": result.step_seconds / max(result.steps, 1),
        "train_seconds": result.seconds,
        "peak_rss": peak,
        "rss_before": rss_before,
        "peak_scope": peak_scope,
        "optimizer_bytes": result.optimizer_bytes,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def child_main(payload: str) -> int:
    raw = json.loads(payload)
    spec = RunSpec(**(raw | {"settings": Settings(**raw["settings"])}))
    entry = measure(spec)
    print(CHILD_MARK + json.dumps(entry), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# Summary


def best_runs(results: dict) -> dict[tuple[str, str], dict]:
    """(method, task) -> the run with the best dev score over the learning rates tried (ties: the smaller lr)."""
    best: dict[tuple[str, str], dict] = {}
    for entry in results["runs"].values():
        key = (entry["method"], entry["task"])
        if key not in best or (entry["score"], -entry["lr"]) > (best[key]["score"], -best[key]["lr"]):
            best[key] = entry
    return best


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarise(results: dict) -> dict:
    """Per method: best score per task, the average over tasks, costs averaged over those best runs."""
    best = best_runs(results)
    methods = [m for m in METHOD_ORDER if any(k[0] == m for k in best)] + sorted(
        {k[0] for k in best} - set(METHOD_ORDER))
    tasks = [t for t in TASKS if any(k[1] == t for k in best)]
    lrs_tried: dict[tuple[str, str], list[float]] = {}
    for e in results["runs"].values():
        lrs_tried.setdefault((e["method"], e["task"]), []).append(e["lr"])
    rows = {}
    for m in methods:
        runs = {t: best[(m, t)] for t in tasks if (m, t) in best}
        complete = len(runs) == len(tasks)
        rows[m] = {
            "scores": {t: 100 * r["score"] for t, r in runs.items()},
            "lrs": {t: r["lr"] for t, r in runs.items()},
            "lrs_tried": {t: sorted(lrs_tried[(m, t)]) for t in runs},
            "average": _mean([100 * r["score"] for r in runs.values()]) if complete else None,
            "trainable": max(r["trainable"] for r in runs.values()),
            "share": max(r["share"] for r in runs.values()),
            "step_seconds": _mean([r["step_seconds"] for r in runs.values()]),
            "peak_rss": _mean([r["peak_rss"] for r in runs.values()]),
            "rss_growth": _mean([r["peak_rss"] - r["rss_before"] for r in runs.values() if r.get("rss_before")]),
            "optimizer_bytes": max(r["optimizer_bytes"] for r in runs.values()),
            "runs": runs,
        }
    return {"methods": methods, "tasks": tasks, "rows": rows, "goals": goals(rows)}


def goals(rows: dict) -> list[dict]:
    """The issue's targets, each with the measured value and whether it is met (None: not measured yet)."""
    full, bitfit, rand = rows.get("full"), rows.get("bitfit"), rows.get("random")

    def ratio(a, b):
        return a / b if a is not None and b else None

    out = []
    sst = (bitfit["scores"].get("sst2") - full["scores"]["sst2"]) if full and bitfit and "sst2" in full["scores"] and "sst2" in bitfit["scores"] else None
    out.append({"goal": "BitFit SST-2 ≥ full FT − 1.5 points", "value": sst, "unit": "points", "met": None if sst is None else sst >= -1.5})
    avg = ratio(bitfit and bitfit["average"], full and full["average"])
    out.append({"goal": "BitFit average ≥ 98 % of full FT's", "value": avg, "unit": "ratio", "met": None if avg is None else avg >= 0.98})
    gap = (bitfit["average"] - rand["average"]) if bitfit and rand and bitfit["average"] is not None and rand["average"] is not None else None
    out.append({"goal": "random subset clearly below BitFit (≥ 1 point on the average)", "value": gap, "unit": "points",
                "met": None if gap is None else gap >= 1.0})
    step = ratio(bitfit and bitfit["step_seconds"], full and full["step_seconds"])
    out.append({"goal": "BitFit step time ≤ 0.7× full FT's", "value": step, "unit": "ratio", "met": None if step is None else step <= 0.7})
    peak = ratio(bitfit and bitfit["peak_rss"], full and full["peak_rss"])
    out.append({"goal": "BitFit peak RSS ≤ 0.6× full FT's", "value": peak, "unit": "ratio", "met": None if peak is None else peak <= 0.6})
    return out


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        sys.exit(child_main(sys.argv[2]))
    sys.exit("usage: python -m bitfit.compare --child SPEC_JSON (the parent is `bitfit compare`)")
