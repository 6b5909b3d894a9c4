"""ONNX Runtime backend benchmark: each figure a ratio measured side by side in one run, on the packaged MiniLM,
real SST-2 dev sentences, CPU, one thread.

    .venv/bin/python bench/onnx_serving.py           # the real run (about 20 minutes on 2 cores)
    .venv/bin/python bench/onnx_serving.py --quick   # tiny sizes: checks the plumbing (about 5 minutes)

1) forward alone, in a child pinned to core 0 (one thread; CPU time of the process): the bias-input graph (every
   row its own task of 100, or one task's row repeated) against a plain ONNX Runtime export of the same model (no
   bias input, the pre-trained biases inside), in fp32 and in int8; and against torch (a bare `model(**batch)` and
   the torch engine's gather forward); plus what the per-batch gather of bank rows costs;
2) HTTP: three `bitfit serve` processes (torch, onnxruntime fp32, onnxruntime int8) pinned to core 0 with one
   thread, 64 closed-loop clients on core 1 sending one input per request; sst2-only traffic and traffic spread
   over 100 tasks; each round runs every backend back to back, in a rotating order.
Each figure is the median over rounds of a per-round ratio. The graphs come from the server's cache (exported
first if missing; BITFIT_ONNX_CACHE or BITFIT_CACHE_DIR move it). Writes bench/results/onnx_serving[_quick].json and
.png and, for the real run, the block between the onnx-serving markers in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from runtime import pin, publish, ratio_rounds, sst2_dev, verdict  # noqa: E402  (shared with the runtime benchmark)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
BEGIN = "<!-- onnx-serving:begin (written by bench/onnx_serving.py from one run; edit outside these markers) -->"
END = "<!-- onnx-serving:end -->"
GOALS = {"http fp32 / torch": 1.6, "http int8 / torch": 2.5, "bias fp32 / plain fp32": 0.95}
SERVER_CORE, LOAD_CORE = 0, 1
N_TASKS = 100
SERVERS = {"torch": {}, "onnxruntime fp32": {"BITFIT_BACKEND": "onnxruntime"},
           "onnxruntime int8": {"BITFIT_BACKEND": "onnxruntime", "BITFIT_QUANTIZE": "int8"}}


def pair_ratio(res: dict, num: str, den: str) -> float:
    """Speed of `num` relative to `den` from one ratio_rounds result (both measured against its base)."""
    r = res["ratio_to_" + res["base"]]
    get = lambda k: 1.0 if k == res["base"] else r[k]  # noqa: E731
    return get(num) / get(den)


def ensure_graphs(cache: Path | None) -> dict:
    """The server's graphs (bias input, fp32 and int8) and the plain reference exports, built once and cached."""
    from server.runtime.onnx_export import default_cache_dir, ensure_graph, export_graph, quantize_graph
    from server.testing import minilm

    backbone = minilm()
    cache = cache or default_cache_dir()
    start = time.perf_counter()
    g32, g8 = ensure_graph(backbone, "fp32", cache), ensure_graph(backbone, "int8", cache)
    plain32 = cache / f"bench-plain-{backbone.layout.fingerprint[:16]}-fp32.onnx"
    plain8 = plain32.with_name(plain32.name.replace("-fp32", "-int8"))
    for target, build in ((plain32, lambda tmp: export_graph(backbone, tmp, plain=True)),
                          (plain8, lambda tmp: quantize_graph(plain32, tmp))):
        if not target.is_file():  # built beside, renamed into place: an interrupted run leaves no half file
            tmp = target.with_name(f".{target.name}.tmp")
            build(tmp)
            os.replace(tmp, target)
    return {"fp32": str(g32.path), "int8": str(g8.path), "plain fp32": str(plain32), "plain int8": str(plain8),
            "export_seconds": g32.meta.get("built_seconds"), "quantize_seconds": g8.meta.get("built_seconds"),
            "seconds_here": time.perf_counter() - start}


# -- part 1: forward alone, in a child pinned to one core ------------------------------------------------------


def forward_part(quick: bool, cache: str | None) -> dict:
    import torch

    from server.runtime.engine import TorchEngine
    from server.runtime.onnx_engine import OrtEngine, make_session
    from server.testing import minilm, random_bias_set

    torch.set_num_threads(1)
    backbone = minilm()
    texts = sst2_dev()
    sets = [random_bias_set(backbone, f"t{k}", seed=k) for k in range(N_TASKS)]
    ort32 = OrtEngine(backbone, cache_dir=cache, threads=1, capacity=N_TASKS)
    ort8 = OrtEngine(backbone, quantize="int8", cache_dir=cache, threads=1, capacity=N_TASKS)
    tch = TorchEngine(copy.deepcopy(backbone), capacity=N_TASKS)
    for engine in (ort32, ort8, tch):
        for s in sets:
            engine.bank.load(s.task, s)
    graphs = ensure_graphs(Path(cache) if cache else None)
    plain = {k: make_session(Path(graphs[k]), 1) for k in ("plain fp32", "plain int8")}
    bare = copy.deepcopy(backbone).model.eval()
    rounds, per_variant, b = (3, 2, 32) if quick else (9, 6, 32)
    batches = [ort32.encode(texts[i * b : (i + 1) * b])[0] for i in range(per_variant)]
    mixed = [[ort32.bank.row(sets[(i * b + j) % N_TASKS].task) for j in range(b)] for i in range(per_variant)]
    one = [ort32.bank.row("t0")] * b
    assert ort32.bank.row("t0") == tch.bank.row("t0") and ort8.bank.row("t0") == ort32.bank.row("t0")

    def plain_run(session):
        names = [i.name for i in session.get_inputs()]
        feeds = [{k: v.numpy() for k, v in x.items() if k in names} for x in batches]
        return lambda: [session.run(None, f) for f in feeds]

    fns = {
        "plain fp32": plain_run(plain["plain fp32"]),
        "bias fp32, 100 tasks": lambda: [ort32.forward(x, m) for x, m in zip(batches, mixed)],
        "bias fp32, 1 task": lambda: [ort32.forward(x, one) for x in batches],
        "plain int8": plain_run(plain["plain int8"]),
        "bias int8, 100 tasks": lambda: [ort8.forward(x, m) for x, m in zip(batches, mixed)],
        "bias int8, 1 task": lambda: [ort8.forward(x, one) for x in batches],
        "torch bare": lambda: [bare(**x) for x in batches],
        "torch gather, 100 tasks": lambda: [tch._gather_forward(x, m) for x, m in zip(batches, mixed)],
    }
    with torch.inference_mode():
        for fn in fns.values():
            fn()  # warm up
        res = ratio_rounds(fns, rounds, "plain fp32", clock=time.process_time) | {"base": "plain fp32"}
        reps = 20 if quick else 200
        t0 = time.process_time()
        for _ in range(reps):
            ort32.gather(mixed[0])
        gather_ms = (time.process_time() - t0) / reps * 1e3
    forward_ms = res["seconds"]["bias fp32, 100 tasks"] / per_variant * 1e3
    res["tokens"] = [int(x["input_ids"].shape[1]) for x in batches]
    res["batch"] = b
    res["gather_ms"], res["forward_ms"] = gather_ms, forward_ms
    res["derived"] = {
        "bias fp32 / plain fp32": pair_ratio(res, "bias fp32, 100 tasks", "plain fp32"),
        "bias fp32 1 task / plain fp32": pair_ratio(res, "bias fp32, 1 task", "plain fp32"),
        "bias int8 / plain int8": pair_ratio(res, "bias int8, 100 tasks", "plain int8"),
        "bias int8 1 task / plain int8": pair_ratio(res, "bias int8, 1 task", "plain int8"),
        "bias fp32 / torch gather": pair_ratio(res, "bias fp32, 100 tasks", "torch gather, 100 tasks"),
        "bias int8 / torch gather": pair_ratio(res, "bias int8, 100 tasks", "torch gather, 100 tasks"),
        "plain fp32 / torch bare": pair_ratio(res, "plain fp32", "torch bare"),
    }
    return res


# -- part 2: HTTP ----------------------------------------------------------------------------------------------


def http_part(quick: bool, tmp: Path, cache: str | None) -> dict:
    from contextlib import ExitStack

    import serving_http as sh
    from bitfit.spec import ServingSpec
    from server.testing import minilm, random_bias_set

    texts = sst2_dev()
    n = 256 if quick else 872
    rounds = 2 if quick else 3
    backbone = minilm()
    store = tmp / "store"
    tasks = [f"t{k}" for k in range(N_TASKS)]
    sh.fill_store(store, ServingSpec.of(backbone), [random_bias_set(backbone, t, seed=k) for k, t in enumerate(tasks)])
    traffic = {"sst2": [("sst2", t) for t in (texts * 2)[:n]],
               "100 tasks": [(tasks[i % N_TASKS], t) for i, t in enumerate((texts * 2)[:n])]}
    pin(LOAD_CORE)  # the load generator: this process
    out = {"requests_per_round": n, "rounds": rounds, "throughput": {s: {t: [] for t in traffic} for s in SERVERS}}
    extra = {"BITFIT_ONNX_CACHE": cache} if cache else {}
    with ExitStack() as stack:
        urls = {}
        for name, env in SERVERS.items():  # one at a time: each start is timed alone, then all three stay up
            log = tmp / f"serve-{name.replace(' ', '-')}.log"
            url, proc = stack.enter_context(sh.bitfit_server(store, log, threads=1, seed=True, env_extra=env | extra,
                                                             prefix=["taskset", "-c", str(SERVER_CORE)]))
            out.setdefault("ready_seconds", {})[name] = sh.wait_ready(url, proc, log, len(tasks) + 3)
            urls[name] = url
        for url in urls.values():
            for t in traffic.values():
                sh.closed_loop(url, t[:128], 64)  # warm up every path
        names = list(SERVERS)
        for r in range(rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                for kind, t in traffic.items():
                    out["throughput"][name][kind].append(sh.closed_loop(urls[name], t, 64))
        out["batches"] = {name: sh.batch_stats(url) for name, url in urls.items()}
    th = out["throughput"]
    out["ratios"] = {f"{name} / torch, {kind}": statistics.median(a / b for a, b in zip(th[name][kind], th["torch"][kind]))
                     for name in names[1:] for kind in traffic}
    return out


# -- report ----------------------------------------------------------------------------------------------------


def markdown(r: dict, png: str) -> str:
    f, h = r["forward"], r["http"]
    d, hr = f["derived"], h["ratios"]
    lines = [f"Run {r['date']} on {r['machine']}: `{r['command']}` ({r['seconds'] / 60:.1f} min; load average "
             f"{r['load_before']:.1f} before, {r['load_after']:.1f} after, on 2 cores).", "",
             "| goal | measured | verdict |", "|---|---|---|"]
    for kind in ("sst2", "100 tasks"):
        for name, goal in (("onnxruntime fp32", GOALS["http fp32 / torch"]), ("onnxruntime int8", GOALS["http int8 / torch"])):
            v = hr[f"{name} / torch, {kind}"]
            lines.append(f"| HTTP {name} / torch, {kind} traffic (one input per request, server on one core) ≥ {goal} "
                         f"| {v:.3f} | {verdict(v, goal)} |")
    v = d["bias fp32 / plain fp32"]
    g = GOALS["bias fp32 / plain fp32"]
    lines.append(f"| forward: bias-input graph (100 tasks per batch) / plain ONNX export, fp32 ≥ {g} | {v:.3f} "
                 f"| {verdict(v, g)} |")
    per = f["seconds"]["plain fp32"] / len(f["tokens"]) * 1e3
    lines += ["", f"Forward alone, batches of {f['batch']} SST-2 dev sentences ({statistics.median(f['tokens']):.0f} "
              f"tokens padded, median), one thread on one core, CPU time; speed relative to the plain fp32 ONNX "
              f"export ({per:.1f} ms a batch):", "", "| variant | speed × plain fp32 |", "|---|---|"]
    for k, v in f["ratio_to_plain fp32"].items():
        lines.append(f"| {k} | {v:.3f} |")
    lines += ["", "Derived (same run): " + "; ".join(f"{k} {v:.3f}" for k, v in d.items()) + f". The per-batch gather "
              f"of 32 bank rows into the `biases` input takes {f['gather_ms']:.3f} ms, "
              f"{f['gather_ms'] / f['forward_ms'] * 100:.2f} % of a forward ({f['forward_ms']:.0f} ms): a one-task "
              "batch takes the same path, its row repeated."]
    lines += ["", f"HTTP: sequences per second per round ({h['requests_per_round']} requests of one input each, 64 "
              "clients):", "", "| round | backend | sst2 | 100 tasks |", "|---|---|---|---|"]
    th = h["throughput"]
    for i in range(h["rounds"]):
        for name in th:
            lines.append(f"| {i + 1} | {name} | {th[name]['sst2'][i]:.1f} | {th[name]['100 tasks'][i]:.1f} |")
    if h.get("batches"):
        lines += ["", "Server batches over the whole run: " + "; ".join(
            f"{name}: " + ", ".join(f"{m} {v['batches']} × {v['mean_inputs']:.1f} inputs" for m, v in b.items())
            for name, b in h["batches"].items()) + "."]
    lines += ["", f"![onnx serving]({png})"]
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d, hr = r["forward"]["derived"], r["http"]["ratios"]
    items = [("HTTP fp32 / torch\nsst2", hr["onnxruntime fp32 / torch, sst2"], GOALS["http fp32 / torch"]),
             ("HTTP fp32 / torch\n100 tasks", hr["onnxruntime fp32 / torch, 100 tasks"], GOALS["http fp32 / torch"]),
             ("HTTP int8 / torch\nsst2", hr["onnxruntime int8 / torch, sst2"], GOALS["http int8 / torch"]),
             ("HTTP int8 / torch\n100 tasks", hr["onnxruntime int8 / torch, 100 tasks"], GOALS["http int8 / torch"]),
             ("forward fp32\nbias input / plain", d["bias fp32 / plain fp32"], GOALS["bias fp32 / plain fp32"]),
             ("forward int8\nbias input / plain", d["bias int8 / plain int8"], None)]
    fig, ax = plt.subplots(figsize=(9, 4))
    vals = [v for _, v, _ in items]
    bars = ax.bar(range(len(items)), vals, color="tab:blue")
    ax.bar_label(bars, [f"{v:.2f}" for v in vals])
    for i, (_, _, g) in enumerate(items):
        if g is not None:
            ax.hlines(g, i - 0.4, i + 0.4, color="black", ls=":", label="goal" if i == 0 else None)
    ax.set_xticks(range(len(items)), [n for n, _, _ in items], fontsize=8)
    ax.set_ylim(0, max(vals + [g for _, _, g in items if g] + [1]) * 1.15)
    ax.set_ylabel("ratio (1.0 = as fast as the reference)")
    ax.set_title(f"bench/onnx_serving.py — {r['date']} (load average {r['load_before']:.1f})", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--cache", help="ONNX graph cache (default: the server's)")
    p.add_argument("--forward-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.forward_child:
        print(json.dumps(forward_part(args.quick, args.cache)))
        return 0
    if len(os.sched_getaffinity(0)) < 2:
        sys.exit("needs two cores (the server on one, the load on the other)")
    start, load_before = time.perf_counter(), os.getloadavg()[0]
    print("0) graphs (exported and quantised once, then cached) ...", flush=True)
    graphs = ensure_graphs(Path(args.cache) if args.cache else None)
    cmd = ["taskset", "-c", str(SERVER_CORE), sys.executable, __file__, "--forward-child"]
    cmd += (["--quick"] if args.quick else []) + (["--cache", args.cache] if args.cache else [])
    print("1) forward alone, in a child pinned to core 0 ...", flush=True)
    forward = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    print("2) HTTP: torch, onnxruntime fp32, onnxruntime int8 servers on core 0 ...", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        http = http_part(args.quick, Path(tmp), args.cache)
    command = ".venv/bin/python bench/onnx_serving.py" + (" --quick" if args.quick else "")
    r = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
         "machine": f"{platform.machine()}, {os.cpu_count()} cores, 1 thread per server", "command": command,
         "seconds": time.perf_counter() - start, "load_before": load_before, "load_after": os.getloadavg()[0],
         "graphs": graphs, "forward": forward, "http": http}
    publish("onnx_serving", r, args.quick, plot, markdown, BEGIN, END, start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
