"""Upload -> live against the number of tasks in the store: one `bitfit serve` per store size, in one run.

For each size N: a store of N random bias sets (the real MiniLM layout), a `bitfit serve` process on it, then
REPS uploads of a new version of one task, each followed by predictions until the answer names the new version
(`serving_http.upload_to_live`). Also times the two store reads an admin call could make: the whole-store scan
(`active_versions`, what a full sync reads) and one task's state (`task`, what `TaskService.sync_task` reads).
Prints a table headed by the command, writes bench/results/upload_live.json and a block in BENCHMARKS.md.

    .venv/bin/python bench/upload_live.py                  # stores of 1 and 1,000 tasks, 10 uploads each (~3 min)
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

import serving_engine as se  # noqa: E402
import serving_http as sh  # noqa: E402
import serving_report as sr  # noqa: E402

BEGIN = "<!-- upload:begin (written by bench/upload_live.py; edit outside these markers) -->"
END = "<!-- upload:end -->"


def measure(backbone, n_tasks: int, reps: int, threads: int, tmp: Path) -> dict:
    from bitfit.spec import ServingSpec

    root = tmp / f"store-{n_tasks}"
    fill_s = sh.fill_store(root, ServingSpec.of(backbone), se.random_sets(backbone, n_tasks))
    with sh.bitfit_server(root, tmp / f"serve-{n_tasks}.log", threads=threads) as (url, proc):
        ready_s = sh.wait_ready(url, proc, tmp / f"serve-{n_tasks}.log", n_tasks)
        payloads = [se.random_bias_set(backbone, "t0", seed=90_000 + i, scale=0.05).to_bytes() for i in range(reps)]
        texts, _ = se.load_texts(1)
        row = sh.upload_to_live(url, "t0", payloads, texts[0])
    reads = {"scan_ms": sh.store_read_ms(root, ServingSpec.of(backbone), reps=5),
             "one_task_ms": sh.store_read_ms(root, ServingSpec.of(backbone), "task", "t0", reps=5)}
    return row | reads | {"tasks": n_tasks, "fill_s": fill_s, "ready_s": ready_s}


def render(results: dict) -> str:
    lines = [f"`{results['command']}` — {results['date']}, load average {results['load_avg']}, "
             f"{results['reps']} uploads per store, medians", "",
             "| tasks in the store | PUT sent → 201 (ms) | 201 → first new answer (ms) | PUT sent → new answer (ms) "
             "| worst (ms) | a prediction alone (ms) | whole-store scan (ms) | one task's state (ms) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["rows"]:
        lines.append(f"| {r['tasks']:,} | {r['put_ms']:.1f} | {r['live_ms']:.1f} | {r['total_ms']:.1f} | "
                     f"{r['total_max_ms']:.1f} | {r['predict_ms']:.1f} | {r['scan_ms']:.1f} | {r['one_task_ms']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default="1,1000", help="comma-separated store sizes (default: %(default)s)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "upload_live.json"))
    p.add_argument("--no-markdown", action="store_true", help="do not touch BENCHMARKS.md")
    args = p.parse_args(argv)
    from server.testing import minilm

    given = sys.argv[1:] if argv is None else argv
    results = {"command": " ".join([".venv/bin/python", "bench/upload_live.py", *map(shlex.quote, given)]),
               "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "load_avg": " ".join(f"{x:.1f}" for x in os.getloadavg()), "reps": args.reps, "rows": []}
    backbone = minilm()
    with tempfile.TemporaryDirectory(prefix="bitfit-upload-") as tmp:
        for n in (int(x) for x in args.tasks.split(",")):
            print(f"store of {n:,} task(s): filling, serving, {args.reps} uploads", flush=True)
            results["rows"].append(measure(backbone, n, args.reps, args.threads, Path(tmp)))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    table = render(results)
    print(table)
    if not args.no_markdown:
        sr.write_block(REPO / "BENCHMARKS.md", table, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
