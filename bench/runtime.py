"""Runtime benchmark: the serving runtime's three ratios, each measured side by side in one run, on the packaged
MiniLM, real SST-2 dev sentences, CPU.

    .venv/bin/python bench/runtime.py            # the real run (about 15 minutes on 2 cores)
    .venv/bin/python bench/runtime.py --quick    # tiny sizes: checks the plumbing (about 3 minutes)

1) forward: the engine's gather forward (every row its own task, through the banked-bias layers) / a bare
   `model(**batch)` of a plain copy of the backbone, on the same batches (8 and 32 inputs); also the engine's whole
   run (forward + heads) and swap, and the same under torch.compile (compiled gather / compiled bare, and compiled /
   eager);
2) heads: the heads of 32 rows from 32 tasks / 32 rows of one task, on the same hidden states;
3) HTTP / limit: `bitfit serve` pinned to core 0 with one torch thread, 64 closed-loop clients pinned to core 1
   sending one input per request / a bare Hugging Face loop (tokenise + model, batches of 32) pinned to core 0, on
   the same sentences; single-task traffic (sst2), and traffic spread over 100 tasks.
Parts 1 and 2 run in a child process pinned to core 0 with one torch thread. Each figure is the median over rounds
of a per-round ratio, the variants of a round run back to back in a rotating order. Writes
bench/results/runtime[_quick].json and .png and, for the real run, the block between the runtime markers in
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
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

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
GLUE = Path(os.environ.get("BITFIT_GLUE_DIR", REPO.parent / "shared" / "data" / "glue"))
BEGIN = "<!-- runtime:begin (written by bench/runtime.py from one run; edit outside these markers) -->"
END = "<!-- runtime:end -->"
GOALS = {"gather_b8": 0.95, "gather_b32": 0.95, "heads": 0.95, "http": 0.90}
SERVER_CORE, LOAD_CORE = 0, 1


def sst2_dev() -> list[str]:
    path = GLUE / "SST-2" / "dev.tsv"
    if not path.is_file():
        sys.exit(f"SST-2 dev sentences not found at {path} (set BITFIT_GLUE_DIR)")
    lines = path.read_text(encoding="utf-8").splitlines()[1:]
    return [line.split("\t")[0].strip() for line in lines if line.strip()]


def pin(core: int) -> None:
    os.sched_setaffinity(0, {core})


def ratio_rounds(fns: dict, rounds: int, base: str, clock=time.perf_counter) -> dict:
    """Seconds per call of each variant per round (rotating order), and the median per-round ratio to `base`
    (speed relative to it: > 1 is faster)."""
    names, times = list(fns), {k: [] for k in fns}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = clock()
            fns[name]()
            times[name].append(clock() - start)
    ratio = {k: statistics.median(b / v for b, v in zip(times[base], times[k])) for k in names if k != base}
    return {"seconds": {k: statistics.median(v) for k, v in times.items()}, "ratio_to_" + base: ratio}


# -- parts 1 and 2: in a child pinned to one core --------------------------------------------------------------


def engine_part(quick: bool) -> dict:
    import torch

    from server.runtime.engine import TorchEngine
    from server.testing import minilm, random_bias_set

    torch.set_num_threads(1)
    backbone = minilm()
    texts = sst2_dev()
    n_tasks = 32
    sets = [random_bias_set(backbone, f"t{k}", seed=k) for k in range(n_tasks)]
    rounds, per_variant = (3, 2) if quick else (9, 6)  # rounds; batches of each size per variant per round
    out: dict = {"forward": {}, "heads": {}, "compiled": {}}

    def build(compile_: bool):
        engine = TorchEngine(copy.deepcopy(backbone), compile=compile_, capacity=n_tasks)
        for s in sets:
            engine.bank.load(s.task, s)
        return engine

    engine = build(False)
    bare = copy.deepcopy(backbone).model.eval()
    with torch.inference_mode():
        for b in (8, 32):
            batches = [engine.encode(texts[i * b : (i + 1) * b])[0] for i in range(per_variant)]
            mixed = [engine.bank.row(s.task) for s in sets[:b]] * (b // min(b, n_tasks))
            one = [engine.bank.row("t0")] * b

            def loop(fn):
                return lambda: [fn(x) for x in batches]

            fns = {
                "bare": loop(lambda x: bare(**x)),
                "gather forward": loop(lambda x: engine._gather_forward(x, mixed)),
                "gather run": loop(lambda x: engine.run(x, mixed, "gather")),
                "swap run": loop(lambda x: engine.run(x, one, "swap")),
            }
            for fn in fns.values():
                fn()  # warm up
            out["forward"][f"b{b}"] = ratio_rounds(fns, rounds, "bare") | {
                "tokens": [int(x["input_ids"].shape[1]) for x in batches]}

            if b == 32:  # heads on the same hidden states
                hidden, pooler = engine._forward(batches[0])
                mask = batches[0]["attention_mask"]
                reps = 50 if quick else 400
                heads = {"1 task": lambda: [engine._heads(hidden, mask, pooler, one) for _ in range(reps)],
                         "32 tasks": lambda: [engine._heads(hidden, mask, pooler, mixed) for _ in range(reps)]}
                for fn in heads.values():
                    fn()
                out["heads"] = ratio_rounds(heads, rounds, "1 task")

        if not quick:
            compiled = build(True)
            bare_c = torch.compile(copy.deepcopy(backbone).model.eval(), dynamic=True)
            batches = [engine.encode(texts[i * 32 : (i + 1) * 32])[0] for i in range(per_variant)]
            mixed = [compiled.bank.row(s.task) for s in sets]
            t0 = time.perf_counter()
            for x in batches:  # compiles (a graph per mode; dynamic shapes)
                compiled._gather_forward(x, mixed)
                bare_c(**x)
            compile_s = time.perf_counter() - t0

            def loop(fn):
                return lambda: [fn(x) for x in batches]

            fns = {"bare": loop(lambda x: bare(**x)), "bare compiled": loop(lambda x: bare_c(**x)),
                   "gather forward": loop(lambda x: engine._gather_forward(x, mixed)),
                   "gather forward compiled": loop(lambda x: compiled._gather_forward(x, mixed))}
            res = ratio_rounds(fns, rounds, "bare")
            t = res["seconds"]
            res["compiled gather / compiled bare"] = t["bare compiled"] / t["gather forward compiled"]
            res["compile_seconds"] = compile_s
            out["compiled"] = res
    return out


# -- part 3: HTTP against the bare loop ------------------------------------------------------------------------


def bare_loop_child(n: int) -> float:
    """Tokenise + model in batches of 32 over the first n SST-2 dev sentences: sequences per second."""
    import torch

    from bitfit.backbone import load_backbone

    torch.set_num_threads(1)
    backbone = load_backbone()
    model, tok = backbone.model.eval(), backbone.tokenizer
    texts = (sst2_dev() * 4)[:n]

    def run(items):
        with torch.inference_mode():
            for i in range(0, len(items), 32):
                enc = tok(items[i : i + 32], padding=True, truncation=True, max_length=backbone.max_length,
                          return_tensors="pt")
                model(**enc)

    run(texts[:64])  # warm up
    start = time.perf_counter()
    run(texts)
    return len(texts) / (time.perf_counter() - start)


def http_part(quick: bool, tmp: Path) -> dict:
    import serving_http as sh
    from bitfit.spec import ServingSpec
    from server.testing import minilm, random_bias_set

    texts = sst2_dev()
    n = 256 if quick else 872
    rounds = 2 if quick else 3
    backbone = minilm()
    store = tmp / "store"
    tasks = [f"t{k}" for k in range(100)]
    sh.fill_store(store, ServingSpec.of(backbone), [random_bias_set(backbone, t, seed=k) for k, t in enumerate(tasks)])
    single = [("sst2", t) for t in (texts * 2)[:n]]
    mixed = [(tasks[i % 100], t) for i, t in enumerate((texts * 2)[:n])]
    bare_cmd = ["taskset", "-c", str(SERVER_CORE), sys.executable, __file__, "--bare-child", str(n)]
    pin(LOAD_CORE)  # the load generator: this process
    out = {"requests_per_round": n, "rounds": rounds, "bare": [], "bare, other core busy": [], "single": [],
           "mixed": []}
    with sh.bitfit_server(store, tmp / "serve.log", threads=1, seed=True,
                          prefix=["taskset", "-c", str(SERVER_CORE)]) as (url, proc):
        sh.wait_ready(url, proc, tmp / "serve.log", len(tasks) + 3)
        sh.closed_loop(url, single[:128], 64)  # warm up both paths
        sh.closed_loop(url, mixed[:128], 64)
        for _ in range(rounds):
            out["bare"].append(float(subprocess.run(bare_cmd, check=True, capture_output=True, text=True).stdout))
            with busy_core(LOAD_CORE):  # the load generator's core busy too, as it is while the server is measured
                out["bare, other core busy"].append(
                    float(subprocess.run(bare_cmd, check=True, capture_output=True, text=True).stdout))
            out["single"].append(sh.closed_loop(url, single, 64))
            out["mixed"].append(sh.closed_loop(url, mixed, 64))
        out["batches"] = sh.batch_stats(url)
    out["single / bare"] = statistics.median(s / b for s, b in zip(out["single"], out["bare"]))
    out["mixed / bare"] = statistics.median(s / b for s, b in zip(out["mixed"], out["bare"]))
    busy = out["bare, other core busy"]
    out["single / bare busy"] = statistics.median(s / b for s, b in zip(out["single"], busy))
    out["mixed / bare busy"] = statistics.median(s / b for s, b in zip(out["mixed"], busy))
    return out


@contextlib.contextmanager
def busy_core(core: int):
    """A spinning process on `core` while the block runs.

    The two vCPUs here may be SMT siblings of one physical core: then the server's forward on core 0 runs slower
    merely because the load generator keeps core 1 busy, and the bare loop, run with core 1 idle, is a limit no
    server measured beside its load generator can reach. The bare loop beside a spinner shows how large that is.
    """
    spinner = subprocess.Popen(["taskset", "-c", str(core), sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.2)
        yield
    finally:
        spinner.kill()
        spinner.wait()


# -- report ----------------------------------------------------------------------------------------------------


def publish(name: str, r: dict, quick: bool, plot, markdown, begin: str, end: str, start: float) -> None:
    """bench/results/NAME[_quick].json and .png, the markdown block printed and, for a real run, written into
    BENCHMARKS.md between `begin` and `end`; then the command line and how long it took."""
    name += "_quick" if quick else ""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(r, indent=2))
    plot(r, RESULTS / f"{name}.png")
    block = markdown(r, f"bench/results/{name}.png")
    print(block)
    if not quick:
        from serving_report import write_block

        write_block(REPO / "BENCHMARKS.md", block, begin, end)
    print(f"\n{r['command']}: {(time.perf_counter() - start) / 60:.1f} min; results in bench/results/{name}.json")


def verdict(value: float, goal: float) -> str:
    return "met" if value >= goal else f"missed ({(1 - value / goal) * 100:.0f} % short)"


def markdown(r: dict, png: str) -> str:
    f, h = r["engine"]["forward"], r["http"]
    lines = [f"Run {r['date']} on {r['machine']}: `{r['command']}` ({r['seconds'] / 60:.1f} min).", "",
             "| goal | measured | verdict |", "|---|---|---|"]
    for b in ("b8", "b32"):
        v = f[b]["ratio_to_bare"]["gather forward"]
        lines.append(f"| gather forward / bare `model(**batch)`, batch {b[1:]} ≥ {GOALS['gather_' + b]} | {v:.3f} "
                     f"| {verdict(v, GOALS['gather_' + b])} |")
    v = r["engine"]["heads"]["ratio_to_1 task"]["32 tasks"]
    lines.append(f"| heads: 32 tasks in a batch / 1 task ≥ {GOALS['heads']} | {v:.3f} | {verdict(v, GOALS['heads'])} |")
    v = h["single / bare"]
    lines.append(f"| HTTP / limit (one input per request, 64 clients, server on one core) ≥ {GOALS['http']} "
                 f"| {v:.3f} | {verdict(v, GOALS['http'])} |")
    lines += ["", "Forward, 1 thread on one core, speed relative to the bare forward (1.00 = as fast; median of "
              "per-round ratios):", "", "| batch | tokens | bare ms | gather forward | gather + heads | swap + heads |",
              "|---|---|---|---|---|---|"]
    for b in ("b8", "b32"):
        x = f[b]
        per = x["seconds"]["bare"] / len(x["tokens"]) * 1e3
        rr = x["ratio_to_bare"]
        lines.append(f"| {b[1:]} | {statistics.median(x['tokens']):.0f} | {per:.1f} | {rr['gather forward']:.3f} "
                     f"| {rr['gather run']:.3f} | {rr['swap run']:.3f} |")
    c = r["engine"].get("compiled")
    if c:
        rr = c["ratio_to_bare"]
        lines += ["", f"torch.compile (inductor, dynamic shapes; {c['compile_seconds']:.0f} s to compile both), batch 32: "
                  f"compiled bare {rr['bare compiled']:.3f}× eager bare, compiled gather {rr['gather forward compiled']:.3f}× "
                  f"eager bare; compiled gather / compiled bare {c['compiled gather / compiled bare']:.3f}."]
    lines += ["", f"HTTP: sequences per second per round ({h['requests_per_round']} requests of one input each):", "",
              "| round | bare loop | bare loop, other core busy | server, sst2 only | server, 100 tasks |",
              "|---|---|---|---|---|"]
    for i, (b, bb, s, m) in enumerate(zip(h["bare"], h["bare, other core busy"], h["single"], h["mixed"]), 1):
        lines.append(f"| {i} | {b:.1f} | {bb:.1f} ({bb / b:.3f}×) | {s:.1f} ({s / b:.3f}×) | {m:.1f} ({m / b:.3f}×) |")
    lines.append(f"| median ratio to the bare loop | | | {h['single / bare']:.3f} | {h['mixed / bare']:.3f} |")
    lines.append(f"| median ratio to the bare loop, other core busy | | | {h['single / bare busy']:.3f} "
                 f"| {h['mixed / bare busy']:.3f} |")
    if h.get("batches"):
        lines += ["", "Server batches over the whole run: " + ", ".join(
            f"{m}: {v['batches']} forwards, {v['mean_inputs']:.1f} inputs each" for m, v in h["batches"].items()) + "."]
    lines += ["", f"![runtime]({png})"]
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    f = r["engine"]["forward"]
    names = ["gather fwd\nbatch 8", "gather fwd\nbatch 32", "heads\n32 tasks / 1", "HTTP / limit\nsst2", "HTTP / limit\n100 tasks"]
    vals = [f["b8"]["ratio_to_bare"]["gather forward"], f["b32"]["ratio_to_bare"]["gather forward"],
            r["engine"]["heads"]["ratio_to_1 task"]["32 tasks"], r["http"]["single / bare"], r["http"]["mixed / bare"]]
    goals = [GOALS["gather_b8"], GOALS["gather_b32"], GOALS["heads"], GOALS["http"], GOALS["http"]]
    fig, ax = plt.subplots(figsize=(8, 4))
    bars = ax.bar(range(len(vals)), vals, color="tab:blue")
    ax.bar_label(bars, [f"{v:.2f}" for v in vals])
    for i, g in enumerate(goals):
        ax.hlines(g, i - 0.4, i + 0.4, color="black", ls=":", label="goal" if i == 0 else None)
    ax.set_xticks(range(len(vals)), names, fontsize=8)
    ax.set_ylim(0, max(vals + [1]) * 1.15)
    ax.set_ylabel("ratio (1.0 = as fast as the reference)")
    ax.set_title(f"bench/runtime.py — {r['date']}", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--engine-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--bare-child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.bare_child:
        print(bare_loop_child(args.bare_child))
        return 0
    if args.engine_child:
        print(json.dumps(engine_part(args.quick)))
        return 0
    if len(os.sched_getaffinity(0)) < 2:
        sys.exit("needs two cores (the server on one, the load on the other)")
    start = time.perf_counter()
    cmd = ["taskset", "-c", str(SERVER_CORE), sys.executable, __file__, "--engine-child"] + (["--quick"] if args.quick else [])
    print("1-2) engine and heads, in a child pinned to core 0 ...", flush=True)
    engine = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    print("3) HTTP against the bare loop ...", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        http = http_part(args.quick, Path(tmp))
    r = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
         "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch 1 thread",
         "command": ".venv/bin/python bench/runtime.py" + (" --quick" if args.quick else ""),
         "seconds": time.perf_counter() - start, "engine": engine, "http": http}
    publish("runtime", r, args.quick, plot, markdown, BEGIN, END, start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
