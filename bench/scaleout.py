"""Scale-out: how fast a change reaches 2 and 4 replicas on one S3 store, what Ray's proxy costs against uvicorn
directly, 2 replicas on 2 Ray nodes against 1, and whether Ray's model multiplexing (routing by task) helps.

1. Propagation (this process, loopback): N = 2 and 4 `bitfit serve` processes on one s3:// store (a real
   SeaweedFS). Changes (uploads, activations, rollbacks in turn) go through each replica in turn; every other
   replica is asked (/predict, every 20 ms) until it answers the new version: seconds from the writer's answer.
2. Ray (bench/scaleout_ray.py, in a loopback-only network namespace, tests/netns.py): a head node and the load
   generator on core 0; node 1 on core 1 with the first replica; node 0 on core 0, added for the second.
   - proxy overhead: sequential /predict of one text through Ray's proxy and, in turns, to a `bitfit serve`
     (uvicorn) pinned to the same core as the replica;
   - throughput: 8 clients sending 8 texts a request for 20 s, 1 replica, then 2;
   - multiplexing: 2 replicas, 8 tasks, one text a request for a random task, routed by load (plain) and by task
     (`multiplex=true`, the `serve_multiplexed_model_id` header), with the forward passes by mode.
Prints the tables with the command that produced them, writes bench/results/scaleout.json and .png, and a block
in BENCHMARKS.md.

    .venv/bin/python bench/scaleout.py                  # ~10 min on 2 busy cores; needs root (ip netns)
    .venv/bin/python bench/scaleout.py --skip-ray       # propagation only
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench"), str(REPO / "tests")]

import serving_report as sr  # noqa: E402

BEGIN = "<!-- scaleout:begin (written by bench/scaleout.py; edit outside these markers) -->"
END = "<!-- scaleout:end -->"
TEXT = {"inputs": ["a gripping, beautifully acted film"]}


def pct(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[int(q) - 1] if len(xs) > 1 else xs[0]


def answered(server, task: str) -> str | None:
    r = server.client.post("/predict", params={"task": task}, json=TEXT)
    return r.json()["version"] if r.status_code == 200 else None


def change(server, op: str, task: str, seed: int) -> str:
    from serve_process import variant

    c = server.client
    if op == "upload":
        r = c.put(f"/tasks/{task}", content=variant(task, seed))
    elif op == "activate":
        others = [v["version"] for v in c.get(f"/tasks/{task}").json()["versions"] if not v["active"]]
        r = c.post(f"/tasks/{task}/activate", json={"version": others[seed % len(others)]})
    else:
        r = c.post(f"/tasks/{task}/rollback")
    assert r.status_code in (200, 201), r.text
    return r.json()["version"]


def propagation(n: int, changes: int, s3, workdir: Path) -> dict:
    """Seconds from a change's answer until each other replica answers with it, per op."""
    from s3_server import BUCKET, KEY, SECRET, new_prefix
    from serve_process import s3_variables, start_all
    from tqdm import tqdm

    location = f"s3://{BUCKET}/{new_prefix(f'prop{n}')}"
    servers = start_all(location, s3_variables(s3.env.endpoint, KEY, SECRET), n, workdir)
    task, out = "prop", {"upload": [], "activate": [], "rollback": []}
    try:
        for seed in range(3):
            change(servers[0], "upload", task, seed)
        alone = []
        for _ in range(20):  # the floor: one /predict by itself
            start = time.perf_counter()
            answered(servers[-1], task)
            alone.append((time.perf_counter() - start) * 1e3)
        for k in tqdm(range(changes), desc=f"{n} replicas", leave=False):
            op = ("upload", "activate", "rollback")[k % 3]
            writer = servers[k % n]
            version = change(writer, op, task, 100 + k)
            acked = time.perf_counter()
            times = {}

            def watch(reader, i):
                while (elapsed := time.perf_counter() - acked) < 10:
                    if answered(reader, task) == version:
                        times[i] = elapsed
                        return
                    time.sleep(0.02)
                times[i] = float("inf")

            threads = [threading.Thread(target=watch, args=(s, i)) for i, s in enumerate(servers) if s is not writer]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            out[op] += list(times.values())
    finally:
        for s in servers:
            s.stop()
    return {"s": out, "predict_alone_ms": statistics.median(alone)}


def run_ray(args, workdir: Path) -> dict:
    from netns import loopback_namespace, run_inside

    out, log = workdir / "ray.json", workdir / "ray.log"
    argv = [sys.executable, str(REPO / "bench" / "scaleout_ray.py"), "--out", str(out), "--workdir",
            str(workdir / "ray"), "--samples", str(args.samples), "--seconds", str(args.seconds)]
    with loopback_namespace("bitfit-bench") as ns, open(log, "w") as f:
        done = run_inside(ns, argv, timeout=3000, log=f)
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(f"bench/scaleout_ray.py failed ({done.returncode}):\n" +
                           "\n".join(log.read_text(errors="replace").splitlines()[-40:]))
    return json.loads(out.read_text())


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def render(r: dict) -> str:
    lines = [f"`{r['command']}` — {r['date']}, load average at the start {r['load_avg']}, {os.cpu_count()} cores",
             "", "**Propagation**: seconds from the writer's answer until another replica answers with the change "
             f"(`bitfit serve` processes on one s3:// store, SeaweedFS on loopback, poll every "
             f"{r['poll_interval_s']} s; {r['changes']} changes through each replica in turn, every other replica "
             "watching)", "",
             "| replicas | change | samples | p50 (s) | p99 (s) | max (s) | within 1 s | a /predict alone (ms) |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for n, res in r["propagation"].items():
        for op, xs in res["s"].items():
            within = sum(x <= 1.0 for x in xs) / len(xs)
            lines.append(_row([n, op, len(xs), f"{pct(xs, 50):.3f}", f"{pct(xs, 99):.3f}", f"{max(xs):.3f}",
                               f"{within:.0%}", f"{res['predict_alone_ms']:.1f}"]))
    ray = r.get("ray")
    if not ray:
        return "\n".join(lines) + "\n"
    o = ray["overhead"]
    proxy_ms = o["proxy_cpu_s"] * 1e3 / len(o["ray_ms"]) if "proxy_cpu_s" in o else None
    lines += ["", "**Ray's proxy against uvicorn directly** (one replica, one text a request, sequential, "
              f"{len(o['ray_ms'])} each in turns; the replica and the uvicorn server on core 1, the client on core 0)",
              "", "| path | p50 (ms) | p99 (ms) | proxy CPU per request (ms) |", "|---|---:|---:|---:|",
              _row(["uvicorn directly", f"{pct(o['direct_ms'], 50):.1f}", f"{pct(o['direct_ms'], 99):.1f}", "-"]),
              _row(["Ray proxy -> replica", f"{pct(o['ray_ms'], 50):.1f}", f"{pct(o['ray_ms'], 99):.1f}",
                    f"{proxy_ms:.1f}" if proxy_ms is not None else "?"]),
              _row(["overhead", f"+{pct(o['ray_ms'], 50) - pct(o['direct_ms'], 50):.1f}",
                    f"+{pct(o['ray_ms'], 99) - pct(o['direct_ms'], 99):.1f}", ""])]
    lines += ["", f"**Throughput** ({ray['settings']['concurrency']} clients, {r['seconds']:.0f} s a run). The "
              "replicas compete with other jobs for these two cores, so beside texts/s each run reports the CPU the "
              "serving processes got (in cores: CPU seconds / wall seconds) and the texts served per CPU second "
              "they used, which the load of the moment does not move. Replica 1 has core 1 to itself (as far as "
              "this benchmark goes); replica 2 shares core 0 with the proxy and the load generator.", "",
              "| run | texts a request | texts/s | p50 (ms) | p99 (ms) | errors | server CPU (cores) | texts per "
              "server CPU s | proxy CPU per request (ms) | load generator CPU (cores) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    runs = (("uvicorn directly, 1 server", "direct_load"), ("Ray, 1 replica", "one"),
            ("Ray, 2 replicas, 2 nodes", "two"),
            ("Ray, 2 replicas, 8 tasks, routed by load", "mixed_plain"),
            ("Ray, 2 replicas, 8 tasks, routed by task (multiplex)", "mixed_multiplex"))
    for name, key in runs:
        x = ray[key]
        cpu, inputs = x["cpu_s"], x.get("inputs", 8 if key in ("direct_load", "one", "two") else 1)
        served = x["inputs_per_s"] * x["wall_s"]
        requests = x.get("requests") or served / inputs
        proxy = "-" if key == "direct_load" else f"{cpu['proxy'] * 1e3 / max(requests, 1):.1f}"
        lines.append(_row([name, inputs, f"{x['inputs_per_s']:.0f}", f"{x['p50_ms']:.0f}", f"{x['p99_ms']:.0f}",
                           x["errors"], f"{cpu['replicas'] / x['wall_s']:.2f}",
                           f"{served / max(cpu['replicas'], 1e-9):.0f}", proxy,
                           f"{cpu['generator'] / x['wall_s']:.2f}"]))
    one, two = ray["one"], ray["two"]
    per_cpu = lambda x: x["inputs_per_s"] * x["wall_s"] / x["cpu_s"]["replicas"]  # noqa: E731
    lines.append(f"\n2 replicas / 1: **{two['inputs_per_s'] / one['inputs_per_s']:.2f}x** texts/s, with "
                 f"{two['cpu_s']['replicas'] / one['cpu_s']['replicas']:.2f}x the CPU; "
                 f"{per_cpu(two) / per_cpu(one):.2f}x the texts per CPU second")
    modes = [(name, ray[key + "_modes"]) for name, key in (("by load", "mixed_plain"), ("by task", "mixed_multiplex"))]
    lines.append("\nOne-task batches (swap; the rest gather several tasks), both replicas: " + ", ".join(
        f"{name} {m.get('swap', 0) / max(sum(m.values()), 1):.0%} of {sum(m.values()):.0f}" for name, m in modes))
    mx, plain = ray["mixed_multiplex"], ray["mixed_plain"]
    lines.append(f"\nmultiplexed / plain: **{mx['inputs_per_s'] / plain['inputs_per_s']:.2f}x** texts/s, "
                 f"**{per_cpu(mx) / per_cpu(plain):.2f}x** texts per CPU second")
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ray = r.get("ray")
    fig, axes = plt.subplots(1, 3 if ray else 1, figsize=(13 if ray else 5, 4), squeeze=False)
    ax = axes[0][0]
    data, labels = [], []
    for n, res in r["propagation"].items():
        data.append([x for xs in res["s"].values() for x in xs])
        labels.append(f"{n} replicas")
    ax.boxplot(data, whis=(1, 99))
    ax.set_xticks(range(1, len(labels) + 1), labels)
    ax.axhline(1.0, color="red", ls="--", lw=1, label="bound: 1 s")
    ax.set_ylabel("s from the change's answer to another replica's")
    ax.set_title("propagation through S3")
    ax.legend(fontsize=8)
    if ray:
        ax = axes[0][1]
        o = ray["overhead"]
        for i, (name, xs) in enumerate((("uvicorn", o["direct_ms"]), ("Ray proxy", o["ray_ms"]))):
            ax.bar([i - 0.2, i + 0.2], [pct(xs, 50), pct(xs, 99)], 0.4, color=["#4c72b0", "#a1b5d8"],
                   label=["p50", "p99"] if i == 0 else None)
        ax.set_xticks([0, 1], ["uvicorn directly", "through Ray's proxy"])
        ax.set_ylabel("ms, one text, sequential")
        ax.set_title("proxy overhead")
        ax.legend(fontsize=8)
        ax = axes[0][2]
        names = ["1 replica", "2 replicas", "2, mixed tasks\nby load", "2, mixed tasks\nby task"]
        runs = [ray[k] for k in ("one", "two", "mixed_plain", "mixed_multiplex")]
        bars = ax.bar(range(4), [x["inputs_per_s"] for x in runs], color=["#4c72b0", "#55a868", "#dd8452", "#c44e52"])
        for bar, x in zip(bars, runs):  # what the replicas got of the busy cores, and what they made of it
            cpu = x["cpu_s"]["replicas"]
            cores, per_cpu = cpu / x["wall_s"], x["inputs_per_s"] * x["wall_s"] / cpu
            ax.annotate(f"{cores:.2f} cores\n{per_cpu:.0f}/CPU s",
                        (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(4), names, fontsize=8)
        ax.set_ylabel("texts/s")
        ax.set_title("throughput on 2 Ray nodes (2 cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--changes", type=int, default=30, help="changes per replica count (default: %(default)s)")
    p.add_argument("--replicas", default="2,4", help="replica counts for the propagation (default: %(default)s)")
    p.add_argument("--samples", type=int, default=200, help="sequential requests a side, proxy overhead")
    p.add_argument("--seconds", type=float, default=20.0, help="length of each throughput run")
    p.add_argument("--skip-ray", action="store_true", help="propagation only")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "scaleout.json"))
    p.add_argument("--no-markdown", action="store_true", help="do not touch BENCHMARKS.md")
    args = p.parse_args(argv)
    given = sys.argv[1:] if argv is None else argv

    from s3_server import SeaweedFS
    from server.settings import Settings

    results = {"command": " ".join([".venv/bin/python", "bench/scaleout.py", *map(shlex.quote, given)]),
               "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "load_avg": " ".join(f"{x:.1f}" for x in os.getloadavg()), "changes": args.changes,
               "seconds": args.seconds, "poll_interval_s": Settings.model_fields["poll_interval_s"].default,
               "propagation": {}}
    with tempfile.TemporaryDirectory(prefix="bitfit-scaleout-") as tmp:
        work = Path(tmp)
        with SeaweedFS(work / "s3") as s3:
            for n in (int(x) for x in args.replicas.split(",")):
                print(f"propagation: {n} replicas, {args.changes} changes", flush=True)
                (work / f"p{n}").mkdir()
                results["propagation"][str(n)] = propagation(n, args.changes, s3, work / f"p{n}")
        failed = None
        if not args.skip_ray:
            print("Ray: proxy overhead, throughput 1 vs 2 replicas, multiplexing (in a network namespace)", flush=True)
            try:
                results["ray"] = run_ray(args, work)
            except RuntimeError as e:  # keep what was measured; the table says the Ray part is missing
                failed = str(e)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    plot(results, Path(args.out).with_suffix(".png"))
    table = render(results)
    print(table)
    if failed:
        print(failed, file=sys.stderr)
        return 1
    if not args.no_markdown:
        sr.write_block(REPO / "BENCHMARKS.md", table, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
