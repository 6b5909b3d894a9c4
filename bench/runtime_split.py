"""Where a `bitfit serve` process's CPU goes under load, for two configurations side by side (alternating, two runs
each): the server pinned to core 0 with one torch thread, 64 closed-loop clients on core 1 sending one SST-2 dev
sentence a request (872 a run); psutil CPU seconds of the HTTP process and of the engine process per request.

    .venv/bin/python bench/runtime_split.py --compare runner      # engine in its own process / on a thread
    .venv/bin/python bench/runtime_split.py --compare allocator   # glibc's mmap threshold at 64 KiB (as the bank
                                                                  # once pinned it) / left alone

Prints one line per run and per process; the numbers are quoted in docs/engine.md and BENCHMARKS.md ("Serving
runtime, second design").
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

CONFIGS = {
    "runner": {"process runner": {}, "thread runner": {"BITFIT_RUNNER": "thread"}},
    "allocator": {"mmap threshold 64 KiB": {"MALLOC_MMAP_THRESHOLD_": "65536"}, "allocator left alone": {}},
}


def cpu_seconds(p) -> float:
    t = p.cpu_times()
    return t.user + t.system


def main(argv=None) -> int:
    import psutil

    import serving_http as sh
    from runtime import LOAD_CORE, SERVER_CORE, pin, sst2_dev

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--compare", choices=sorted(CONFIGS), required=True)
    args = p.parse_args(argv)
    requests = [("sst2", t) for t in (sst2_dev() * 2)[:872]]
    pin(LOAD_CORE)
    tmp = Path(tempfile.mkdtemp(prefix="runtime-split-"))
    print(f".venv/bin/python bench/runtime_split.py --compare {args.compare}")
    for label, env in list(CONFIGS[args.compare].items()) * 2:
        with sh.bitfit_server(tmp / "store", tmp / "serve.log", threads=1, seed=True, env_extra=env,
                              prefix=["taskset", "-c", str(SERVER_CORE)]) as (url, proc):
            sh.wait_ready(url, proc, tmp / "serve.log", 3)
            sh.closed_loop(url, requests[:128], 64)  # warm up
            root = psutil.Process(proc.pid)
            procs = [root] + [c for c in root.children(recursive=True) if "resource_tracker" not in " ".join(c.cmdline())]
            before = {q.pid: cpu_seconds(q) for q in procs}
            start = time.perf_counter()
            rate = sh.closed_loop(url, requests, 64)
            wall = time.perf_counter() - start
            print(f"{label}: {rate:.1f} seq/s, {wall:.1f} s")
            for q in procs:
                used = cpu_seconds(q) - before[q.pid]
                role = "HTTP process" if q.pid == proc.pid else "engine process"
                print(f"   {role}: {used / len(requests) * 1e3:.1f} ms CPU per request, {used / wall * 100:.0f} % of wall")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
