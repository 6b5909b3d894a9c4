"""Store latency, directory backend against S3 (a real SeaweedFS on loopback), side by side in one run.

Both stores first get `--tasks` tasks (so a poll that scaled with the tasks would show it), then, operation by
operation, the directory store and the S3 store take turns: `put` of a new version (real MiniLM-sized bias sets,
108 KB, validated against the real backbone's spec), `activate` of an older version, a `poll` when nothing
changed (`generation()`, what a replica runs every few hundred ms), `changes_since` after another store's
change (a poll that finds one: the LIST and the new entry), and `read` of a version. Prints p50 / p99 per
operation with the command that produced it, writes bench/results/store_latency.json (and .png) and a block
in BENCHMARKS.md.

    .venv/bin/python bench/store_latency.py            # 100 tasks, 200 samples an operation (~1-2 min)
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench"), str(REPO / "tests")]

import serving_report as sr  # noqa: E402

BEGIN = "<!-- store-latency:begin (written by bench/store_latency.py; edit outside these markers) -->"
END = "<!-- store-latency:end -->"
OPS = ("put", "activate", "poll", "changes_since", "read")


def bias_sets(layout, hidden: int, task: str, n: int, seed: int) -> list[bytes]:
    import torch

    from bitfit.bias_set import BiasSet

    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(seed + i)
        out.append(BiasSet(task, torch.randn(layout.size, generator=g) * 0.01,
                           {"out.weight": torch.randn(2, hidden, generator=g), "out.bias": torch.zeros(2)},
                           ["negative", "positive"], layout.fingerprint).to_bytes())
    return out


def timed(fn, n: int) -> list[float]:
    out = []
    for i in range(n):
        start = time.perf_counter()
        fn(i)
        out.append((time.perf_counter() - start) * 1e3)
    return out


def pct(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[int(q) - 1] if len(xs) > 1 else xs[0]


def measure(stores: dict, watchers: dict, sets: list[bytes], n: int) -> dict:
    """{op: {backend: [ms, ...]}}, the backends taking turns per operation."""
    out = {op: {} for op in OPS}
    for name, store in stores.items():
        out["put"][name] = timed(lambda i: store.put("bench", sets[i]), n)
    versions = stores["dir"].task("bench").versions  # the same bytes in both: the same version ids
    for name, store in stores.items():
        out["activate"][name] = timed(lambda i: store.activate("bench", versions[(i * 7) % len(versions)].version), n)
    for name, store in stores.items():
        out["poll"][name] = timed(lambda i: store.generation(), n)
    for name, store in stores.items():
        watcher, seen = watchers[name], watchers[name].generation()
        samples, active = [], store.task("bench").active
        for _ in range(n):
            active = versions[0].version if versions[0].version != active else versions[1].version
            store.activate("bench", active)  # a change every time, made by the other store
            start = time.perf_counter()
            g, tasks = watcher.changes_since(seen)
            samples.append((time.perf_counter() - start) * 1e3)
            assert tasks == ["bench"], (name, tasks)
            seen = g
        out["changes_since"][name] = samples
    for name, store in stores.items():
        out["read"][name] = timed(lambda i: watchers[name].read("bench", versions[i % len(versions)].version), n)
    return out


def render(r: dict) -> str:
    lines = [f"`{r['command']}` — {r['date']}, load average {r['load_avg']}, {r['tasks']} tasks in each store, "
             f"{r['samples']} samples an operation, bias sets of {r['set_bytes']:,} bytes; S3: SeaweedFS "
             f"{r['seaweedfs']} on loopback; directory: {r['dir_fs']}", "",
             "| operation | directory p50 (ms) | directory p99 (ms) | S3 p50 (ms) | S3 p99 (ms) | S3 / directory (p50) |",
             "|---|---:|---:|---:|---:|---:|"]
    for op in OPS:
        d, s = r["ms"][op]["dir"], r["ms"][op]["s3"]
        lines.append(f"| {op} | {pct(d, 50):.2f} | {pct(d, 99):.2f} | {pct(s, 50):.2f} | {pct(s, 99):.2f} | "
                     f"{pct(s, 50) / pct(d, 50):.1f}x |")
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.2
    for k, (backend, q, color) in enumerate((("dir", 50, "#4c72b0"), ("dir", 99, "#a1b5d8"),
                                              ("s3", 50, "#dd8452"), ("s3", 99, "#f0c2a0"))):
        xs = [i + (k - 1.5) * width for i in range(len(OPS))]
        ax.bar(xs, [pct(r["ms"][op][backend], q) for op in OPS], width,
               label=f"{'directory' if backend == 'dir' else 'S3 (SeaweedFS)'} p{q}", color=color)
    ax.set_xticks(range(len(OPS)), OPS)
    ax.set_yscale("log")
    ax.set_ylabel("ms (log scale)")
    ax.set_title(f"bias store latency, {r['tasks']} tasks, {r['samples']} samples an operation")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=100, help="tasks in each store before measuring (default: %(default)s)")
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "store_latency.json"))
    p.add_argument("--no-markdown", action="store_true", help="do not touch BENCHMARKS.md")
    args = p.parse_args(argv)
    given = sys.argv[1:] if argv is None else argv

    from tqdm import tqdm

    from bias_store import open_store
    from bitfit.backbone import load_backbone
    from bitfit.spec import ServingSpec
    from s3_server import BUCKET, SeaweedFS

    backbone = load_backbone()
    spec, layout = ServingSpec.of(backbone), backbone.layout
    sets = bias_sets(layout, backbone.hidden_size, "bench", args.samples, seed=1000)
    fillers = [bias_sets(layout, backbone.hidden_size, f"t{i}", 1, seed=i)[0] for i in range(args.tasks)]
    with tempfile.TemporaryDirectory(prefix="bitfit-store-bench-") as tmp, SeaweedFS(Path(tmp) / "s3") as s3:
        os.environ.update(s3.env.variables())
        locations = {"dir": str(Path(tmp) / "store"), "s3": f"s3://{BUCKET}/bench"}
        stores = {k: open_store(v, spec) for k, v in locations.items()}
        watchers = {k: open_store(v, spec) for k, v in locations.items()}  # another replica, as it were
        for name, store in stores.items():
            for i, data in enumerate(tqdm(fillers, desc=f"filling {name}", leave=False)):
                store.put(f"t{i}", data)
        print(f"measuring {', '.join(OPS)}: {args.samples} samples each, directory and S3 in turn", flush=True)
        ms = measure(stores, watchers, sets, args.samples)
        weed = os.popen(f"{s3.proc.args[0]} version 2>/dev/null").read().split()[2:3] or ["?"]
        dir_fs = os.popen(f"df -T {tmp} | tail -1").read().split()[1:2] or ["?"]
    results = {"command": " ".join([".venv/bin/python", "bench/store_latency.py", *map(shlex.quote, given)]),
               "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "load_avg": " ".join(f"{x:.1f}" for x in os.getloadavg()), "tasks": args.tasks,
               "samples": args.samples, "set_bytes": len(sets[0]), "seaweedfs": weed[0], "dir_fs": f"{dir_fs[0]} (fsync)",
               "ms": ms}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    plot(results, Path(args.out).with_suffix(".png"))
    table = render(results)
    print(table)
    if not args.no_markdown:
        sr.write_block(REPO / "BENCHMARKS.md", table, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
