"""Serving benchmark: bitfit-serve against the alternatives a user would pick, on the packaged MiniLM, CPU.

    .venv/bin/python bench/serving.py --quick      # tiny sizes: checks the plumbing (about 2 minutes)
    .venv/bin/python bench/serving.py              # the real run (about 10 minutes on 2 cores)

Everything is measured in one run, on the same machine and the same traffic, and reported as ratios:
absolute times on a shared machine are noise. Compared variants run in the same rounds in a rotating order
and each figure is a median over rounds. Writes bench/results/serving[_quick].json and .png and, for the real
run, the block between the serving markers in BENCHMARKS.md (text outside the markers is kept).

1) swap cost: one in-place swap of a whole bias set / one batch forward (batch 8 and 32);
2) mixed-task throughput over 1, 10, 100, 1,000 tasks / single-task throughput, engine alone and through HTTP,
   for the swap-only policy and the default one that gathers per row;
3) process memory with 0, 100, 1,000, 10,000 resident tasks, in child processes; bytes per task / raw bytes;
4) upload -> live through HTTP;
5) peers on the same traffic: PEFT multi-LoRA (rank 8, query/value, mixed batches via adapter_names), one
   model copy per task, reloading a fine-tuned model per request batch;
6) HTTP overhead: throughput at saturation / engine alone; p50 and p99 latency at half of saturation.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402
import torch  # noqa: E402

import serving_engine as se  # noqa: E402
import serving_http as sh  # noqa: E402
import serving_report as sr  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


@dataclass(frozen=True)
class Sizes:
    tasks: tuple[int, ...] = (1, 10, 100, 1000)  # mixed-task traffic; 1 is the baseline
    batch: int = 32  # inputs per forward (the server's default max_batch)
    batches_per_run: int = 2  # workload of one variant in one round
    rounds: int = 5
    swap_batches: tuple[int, ...] = (8, 32)
    swap_rounds: int = 9
    swaps_per_block: int = 400
    peft_tasks: tuple[int, ...] = (10, 100)
    copies_tasks: tuple[int, ...] = (10,)  # 100 copies would need ~9 GB on a shared 23 GB machine
    reload_tasks: int = 10
    reload_rounds: int = 3
    memory_counts: tuple[int, ...] = (0, 100, 1000, 10000)
    peft_memory_counts: tuple[int, ...] = (0, 10, 100)
    copies_memory_counts: tuple[int, ...] = (0, 10)
    http_tasks: tuple[int, ...] = (1, 10, 100, 1000)
    http_requests: int = 128  # per phase, one input per request
    http_concurrency: int = 64  # closed-loop clients: enough to keep the batcher's queue full
    http_rounds: int = 3
    latency_requests: int = 300
    upload_reps: int = 10


QUICK = Sizes(tasks=(1, 2, 4), batch=4, batches_per_run=1, rounds=2, swap_batches=(2, 4), swap_rounds=2,
              swaps_per_block=50, peft_tasks=(2, 4), copies_tasks=(2,), reload_tasks=2, reload_rounds=1,
              memory_counts=(0, 4, 16), peft_memory_counts=(0, 2, 4), copies_memory_counts=(0, 1),
              http_tasks=(1, 4), http_requests=8, http_concurrency=4, http_rounds=1, latency_requests=8, upload_reps=2)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cores": os.cpu_count(), "cpu": cpu, "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "load_avg_start": os.getloadavg()}


# -- 1, 2, 5: in process -------------------------------------------------------------------------------------

def engine_section(backbone, sets, sz: Sizes, tmp: Path) -> tuple[dict, object]:
    texts, source = se.load_texts(sz.batch * sz.batches_per_run)
    engine = se.make_engine(backbone, sets, max_batch=sz.batch)
    out: dict = {"texts": source, "requests_per_run": len(texts), "batch": sz.batch}

    log("1) swap cost")
    encoded = {b: engine.encode(texts[:b])[0] for b in sz.swap_batches}
    out["swap"] = se.swap_cost(engine, encoded, sz.swap_rounds, sz.swaps_per_block, n_tasks=len(sets))

    log("2, 5) mixed-task throughput: our two policies, PEFT multi-LoRA, model copies (interleaved)")
    work = {t: se.batches(texts, se.assign_tasks(len(texts), t), sz.batch) for t in sorted({*sz.tasks, *sz.peft_tasks,
                                                                                             *sz.copies_tasks})}
    modes: dict[str, dict] = {}
    variants = {"ours T=1": se.engine_policy(engine, work[1], 1, modes.setdefault("ours T=1", {}))}
    for t in sz.tasks[1:]:
        variants[f"gather T={t}"] = se.engine_policy(engine, work[t], 1, modes.setdefault(f"gather T={t}", {}))
        variants[f"swap-only T={t}"] = se.engine_policy(engine, work[t], se.SWAP_ONLY,
                                                        modes.setdefault(f"swap-only T={t}", {}))
    for t in sz.peft_tasks:
        if f"gather T={t}" not in variants:
            variants[f"gather T={t}"] = se.engine_policy(engine, work[t], 1)
    heads = se.Heads(max(sz.peft_tasks + sz.copies_tasks), backbone.hidden_size)
    peft = se.peft_multi_lora(backbone, max(sz.peft_tasks))
    for t in sz.peft_tasks:
        variants[f"peft T={t}"] = se.peft_policy(peft, engine, heads, work[t])
    copies = se.model_copies(backbone, sets[: max(sz.copies_tasks)])
    for t in sz.copies_tasks:
        variants[f"copies T={t}"] = se.copies_policy(copies, engine, heads, work[t])
    samples = se.interleave(variants, sz.rounds)
    out["throughput"] = se.summary(samples)
    out["throughput_samples"] = samples
    out["modes"] = modes
    base = samples["ours T=1"]
    out["ratio_to_single"] = {k: se.median_ratio(v, base) for k, v in samples.items()}
    out["ours_over_peft"] = {t: se.median_ratio(samples[f"gather T={t}"], samples[f"peft T={t}"])
                             for t in sz.peft_tasks}
    out["ours_over_copies"] = {t: se.median_ratio(samples[f"gather T={t}"], samples[f"copies T={t}"])
                               for t in sz.copies_tasks}
    del peft, copies, variants
    gc.collect()

    log("5) reloading a fine-tuned model per request batch (one task per batch)")
    single = se.batches(texts[: sz.batch], [0] * sz.batch, sz.batch)
    swappers = [se.engine_policy(engine, [(single[0][0], [k] * sz.batch)], 1) for k in range(sz.reload_tasks)]
    turn = {"i": 0}

    def ours_swapping() -> int:  # a different task every batch, so every batch pays a swap
        turn["i"] += 1
        return swappers[turn["i"] % sz.reload_tasks]()

    directory = se.save_finetuned(backbone, sets[0], tmp / "finetuned")
    reload = se.interleave({"ours, swap per batch": ours_swapping,
                            "reload per batch": se.reload_policy(directory, engine, heads, single)}, sz.reload_rounds)
    out["reload"] = {"throughput": se.summary(reload),
                     "ours_over_reload": se.median_ratio(reload["ours, swap per batch"], reload["reload per batch"])}
    return out, engine


# -- 3: child processes --------------------------------------------------------------------------------------

MEMORY_KINDS = ("bank", "bank-doubling", "peft", "copies")


def memory_section(sz: Sizes, threads: int, kinds: tuple[str, ...] = MEMORY_KINDS) -> dict:
    counts = {"bank": sz.memory_counts, "bank-doubling": sz.memory_counts, "peft": sz.peft_memory_counts,
              "copies": sz.copies_memory_counts}
    out = {}
    for kind in kinds:
        log(f"3) memory: {kind} {counts[kind]}")
        cmd = [sys.executable, str(REPO / "bench" / "serving_memory.py"), "--kind", kind,
               "--counts", ",".join(map(str, counts[kind])), "--threads", str(threads)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO)
        if done.returncode != 0:
            raise RuntimeError(f"memory probe {kind} failed: {done.stderr[-2000:]}")
        out[kind] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


# -- 2, 4, 6: through HTTP -----------------------------------------------------------------------------------

def start_servers(stack: contextlib.ExitStack, sz: Sizes, threads: int, tmp: Path) -> dict:
    """Three `bitfit serve` processes: gather and swap-only policies on the big store, and one on an empty store
    (upload -> live without other tasks). They load while the memory probes run; call `ready` before use."""
    log("HTTP: starting three `bitfit serve` processes (gather, swap-only, small)")
    servers = {}
    for name, store, group in (("gather", tmp / "store", 1), ("swap-only", tmp / "store", se.SWAP_ONLY),
                               ("small", tmp / "small-store", 1)):
        own = contextlib.ExitStack()  # each can be stopped on its own; the outer stack stops the rest
        stack.callback(own.close)
        url, proc = own.enter_context(sh.bitfit_server(store, tmp / f"{name}.log", threads=threads,
                                                       group_max_tasks=group, max_batch=sz.batch))
        servers[name] = {"url": url, "proc": proc, "log": tmp / f"{name}.log", "stop": own.close}
    return servers


def http_section(backbone, engine, servers: dict, sz: Sizes, fill_s: float) -> dict:
    out: dict = {"concurrency": sz.http_concurrency, "requests_per_phase": sz.http_requests, "store_fill_s": fill_s}
    n_tasks = max(sz.http_tasks)
    out["ready_s"] = {}
    for name, s in servers.items():
        out["ready_s"][name] = sh.wait_ready(s["url"], s["proc"], s["log"], n_tasks if name != "small" else 0)
    out["server_rss"] = {name: sh.rss_of(s["proc"].pid) for name, s in servers.items()}
    gather_url, swap_url = servers["gather"]["url"], servers["swap-only"]["url"]
    texts, _ = se.load_texts(sz.http_requests)
    requests = {t: [(f"t{k}", x) for x, k in zip(texts, se.assign_tasks(len(texts), t, seed=1))] for t in sz.http_tasks}
    texts_e, _ = se.load_texts(sz.batch * sz.batches_per_run)
    engine_work = se.batches(texts_e, [0] * len(texts_e), sz.batch)

    def phase(url: str, reqs: list) -> Callable[[], int]:
        def run() -> int:
            sh.closed_loop(url, reqs, sz.http_concurrency)
            return len(reqs)
        return run

    log("2, 6) HTTP throughput phases, interleaved with the engine alone")
    variants = {"engine alone T=1": se.engine_policy(engine, engine_work, 1)}
    for t in sz.http_tasks:
        variants[f"http gather T={t}"] = phase(gather_url, requests[t])
        variants[f"http swap-only T={t}"] = phase(swap_url, requests[t])  # T=1: the swap-only server's own baseline
    samples = se.interleave(variants, sz.http_rounds)
    out["throughput"] = se.summary(samples)
    out["throughput_samples"] = samples
    out["ratio_to_single"] = {k: se.median_ratio(v, samples[f"http {k.split()[1]} T=1"])
                              for k, v in samples.items() if k.startswith("http ")}
    out["overhead"] = se.median_ratio(samples["http gather T=1"], samples["engine alone T=1"])
    out["batches"] = {name: sh.batch_stats(servers[name]["url"]) for name in ("gather", "swap-only")}
    servers["swap-only"]["stop"]()  # it would reload every upload too: stop it before timing uploads

    rate = out["throughput"]["http gather T=1"]["median"] / 2
    log(f"6) latency at half of saturation ({rate:.1f} requests/s, one input each)")
    lat_texts, _ = se.load_texts(sz.latency_requests)
    out["latency"] = sh.open_loop(gather_url, [("t0", x) for x in lat_texts], rate)

    log("4) upload -> live (server with many tasks, then an otherwise empty one)")
    out["upload"], out["upload_small"] = {}, {}
    for name, key, resident in (("gather", "upload", n_tasks), ("small", "upload_small", 0)):
        url = servers[name]["url"]
        payloads = [se.random_bias_set(backbone, "live", seed=50_000 + i, scale=0.05).to_bytes()
                    for i in range(sz.upload_reps + 1)]
        r = httpx.put(f"{url}/tasks/live", content=payloads[0], timeout=120,
                      headers={"Authorization": f"Bearer {sh.TOKEN}", "Content-Type": "application/octet-stream"})
        r.raise_for_status()
        out[key] = sh.upload_to_live(url, "live", payloads[1:], texts[0])
        out[key]["resident_tasks"] = resident + 1
    out["server_rss_end"] = sh.rss_of(servers["gather"]["proc"].pid)
    return out


# -- main ----------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes: check the plumbing")
    p.add_argument("--threads", type=int, default=1, help="torch threads, in process and in the servers (default 1)")
    p.add_argument("--only", default="engine,memory,http", help="comma list of sections to run")
    p.add_argument("--rounds", type=int, help="override the rounds of the in-process comparison")
    p.add_argument("--no-markdown", action="store_true", help="do not touch BENCHMARKS.md")
    p.add_argument("--out", help="JSON path (default bench/results/serving[_quick].json)")
    p.add_argument("--render", metavar="JSON",
                   help="only redo the table, plot and BENCHMARKS.md block from a saved run")
    args = p.parse_args(argv)
    if args.render:
        return render(Path(args.render), markdown=not args.no_markdown)
    sz = QUICK if args.quick else Sizes()
    if args.rounds:
        sz = replace(sz, rounds=args.rounds)
    sections = set(args.only.split(","))
    torch.set_num_threads(args.threads)
    given = sys.argv[1:] if argv is None else argv
    command = " ".join([".venv/bin/python", "bench/serving.py", *map(shlex.quote, given)])
    json_path = Path(args.out) if args.out else RESULTS / ("serving_quick.json" if args.quick else "serving.json")
    started = time.perf_counter()
    results: dict = {"command": command, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     "machine": machine(), "sizes": asdict(sz), "quick": args.quick}
    log(f"{command}  ({results['machine']['cores']} cores, load {results['machine']['load_avg_start']})")

    def save(partial: bool) -> None:  # after every section, so a failure late in the run keeps what was measured
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({**results, "partial": partial}, indent=2, default=str))

    from bitfit.spec import ServingSpec
    from server.testing import minilm

    backbone = minilm()
    sets = se.random_sets(backbone, max(sz.tasks + sz.http_tasks))
    with tempfile.TemporaryDirectory(prefix="bitfit-bench-") as tmp_name, contextlib.ExitStack() as stack:
        tmp = Path(tmp_name)
        engine = None
        if "engine" in sections:  # timing-sensitive: runs alone
            results["engine"], engine = engine_section(backbone, sets, sz, tmp)
            save(partial=True)
        if "http" in sections:  # the store is written (fsync-bound) while the memory probes run
            pool = ThreadPoolExecutor(1)
            stack.callback(pool.shutdown)
            fill = pool.submit(sh.fill_store, tmp / "store", backbone.layout, sets[: max(sz.http_tasks)])
        if "memory" in sections:
            results["memory"] = memory_section(sz, args.threads, ("bank", "bank-doubling"))
            save(partial=True)
        if "http" in sections:
            fill_s = fill.result()
            scan_ms = sh.store_read_ms(tmp / "store", ServingSpec.of(backbone))
            (tmp / "small-store").mkdir()
            servers = start_servers(stack, sz, args.threads, tmp)  # they load while the last probes run
        if "memory" in sections:
            results["memory"].update(memory_section(sz, args.threads, ("peft", "copies")))
            save(partial=True)
        if "http" in sections:
            engine = engine or se.make_engine(backbone, sets, sz.batch)
            results["http"] = http_section(backbone, engine, servers, sz, fill_s)
            results["http"]["store_scan_ms"] = scan_ms
    results["machine"]["load_avg_end"] = os.getloadavg()
    results["wall_s"] = time.perf_counter() - started
    save(partial=False)
    full = not args.quick and sections == {"engine", "memory", "http"}
    return render(json_path, markdown=full and not args.no_markdown)


def render(json_path: Path, markdown: bool) -> int:
    """Table to stdout, plot beside the JSON, and (markdown=True) the block in BENCHMARKS.md."""
    results = json.loads(json_path.read_text())
    png = json_path.with_suffix(".png")
    sr.plot(results, png)
    print(sr.console(results))
    if markdown:
        rel = lambda q: q.resolve().relative_to(REPO) if q.resolve().is_relative_to(REPO) else q  # noqa: E731
        sr.write_block(REPO / "BENCHMARKS.md", sr.markdown(results, rel(png), rel(json_path)))
        log("BENCHMARKS.md updated")
    log(f"wrote {json_path} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
