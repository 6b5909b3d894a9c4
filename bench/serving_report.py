"""Rendering of the serving benchmark's results: the verdict against the goals, the tables (printed and written
into BENCHMARKS.md between markers) and the plot. Works on the JSON form of the results (string keys), so
`bench/serving.py --render FILE` can redo the tables from a saved run without measuring again.
"""

from __future__ import annotations

import re
from pathlib import Path

BEGIN = "<!-- serving:begin (written by bench/serving.py from one run; edit outside these markers) -->"
END = "<!-- serving:end -->"

GOALS = {"swap_pct": 0.1, "mixed_100": 0.95, "memory_x_raw": 1.1, "upload_ms": 50.0, "over_peft": 3.0}


def _tasks(samples: dict, prefix: str) -> list[int]:
    return sorted(int(k.split("T=")[1]) for k in samples if k.startswith(prefix))


def _near(values: list[int], want: int) -> int | None:
    """`want` if measured, else the largest measured value below it (quick runs use tiny sizes)."""
    below = [v for v in values if v <= want]
    return max(below) if below else None


def _verdict(value: float, target: float, at_most: bool) -> str:
    if at_most:
        return "met" if value <= target else f"missed: {value / target:.2f}× the limit"
    return "met" if value >= target else f"missed: {value / target:.2f}× the goal ({(1 - value / target) * 100:.0f} % short)"


def verdicts(r: dict) -> list[tuple[str, str, str]]:
    """(goal, measured, verdict) rows for whatever sections the run has."""
    rows, e, m, h = [], r.get("engine"), r.get("memory"), r.get("http")
    if e:
        b = e["swap"]["batches"]
        worst = max(b.values(), key=lambda x: x["ratio"])
        pct = worst["ratio"] * 100
        rows.append((f"swap ≤ {GOALS['swap_pct']} % of a forward",
                     " / ".join(f"batch {k}: {v['ratio'] * 100:.3f} %" for k, v in b.items()),
                     _verdict(pct, GOALS["swap_pct"], True)))
        t = _near(_tasks(e["ratio_to_single"], "gather T="), 100)
        if t:
            v = e["ratio_to_single"][f"gather T={t}"]
            rows.append((f"{t}-task traffic ≥ {GOALS['mixed_100']}× single-task, engine alone (gather)", f"{v:.3f}×",
                         _verdict(v, GOALS["mixed_100"], False)))
    if h:
        t = _near(_tasks(h["ratio_to_single"], "http gather T="), 100)
        if t and t > 1:
            v = h["ratio_to_single"][f"http gather T={t}"]
            rows.append((f"{t}-task traffic ≥ {GOALS['mixed_100']}× single-task, through HTTP (gather)", f"{v:.3f}×",
                         _verdict(v, GOALS["mixed_100"], False)))
    if m:
        for kind, label in (("bank", "as shipped"), ("bank-doubling", "before: table doubling, default mmap threshold")):
            pts = [p for p in m.get(kind, {}).get("points", []) if p["count"]]
            if pts:
                worst = max(p["per_task_x_raw"] for p in pts)
                rows.append((f"memory per task ≤ {GOALS['memory_x_raw']}× raw bytes, {label}",
                             " / ".join(f"{p['count']:,}: {p['per_task_x_raw']:.2f}×" for p in pts),
                             _verdict(worst, GOALS["memory_x_raw"], True)))
    if h and "upload" in h:
        for key in ("upload", "upload_small"):
            u = h.get(key)
            if not u:
                continue
            rows.append((f"upload → live ≤ {GOALS['upload_ms']:.0f} ms, {u['resident_tasks']:,} resident task(s): "
                         "201 received → first answer by the new version",
                         f"median {u['live_ms']:.1f} ms (a prediction alone: {u['predict_ms']:.1f} ms)",
                         _verdict(u["live_ms"], GOALS["upload_ms"], True)))
            rows.append(("… the same, counted from the moment the PUT is sent",
                         f"median {u['total_ms']:.1f} ms, max {u['total_max_ms']:.1f} ms",
                         _verdict(u["total_ms"], GOALS["upload_ms"], True)))
    if e:
        for t, v in e["ours_over_peft"].items():
            rows.append((f"≥ {GOALS['over_peft']:.0f}× PEFT mixed-batch throughput, {t} tasks", f"{v:.2f}×",
                         _verdict(v, GOALS["over_peft"], False)))
    return rows


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _mib(b: float) -> str:
    return f"{b / 2**20:,.1f}"


def _kib(b: float | None) -> str:
    return "–" if b is None else f"{b / 1024:,.1f}"


def markdown(r: dict, png: Path | str | None = None, json_path: Path | str | None = None) -> str:
    mach, out = r["machine"], []
    out.append("## Serving: bitfit-serve against the alternatives (`bench/serving.py`)\n")
    out.append(f"Produced by `{r['command']}` on {r['date']}"
               + (f" (results: `{json_path}`)" if json_path else "") + ".  ")
    la0 = mach["load_avg_start"]
    la1 = mach.get("load_avg_end", la0)
    if r.get("partial"):
        out.append("**Partial run: a section failed or was cut short; only what is shown was measured.**\n")
    out.append(f"Machine: {mach['cores']} CPU cores ({mach['cpu']}), shared with other jobs (load average "
               f"{la0[0]:.1f} at the start, {la1[0]:.1f} at the end); torch {mach['torch']}, "
               f"{mach['threads']} torch thread per process, Python {mach['python']}; wall time "
               f"{r.get('wall_s', 0) / 60:.1f} min.  ")
    e, m, h = r.get("engine"), r.get("memory"), r.get("http")
    if e:
        out.append(f"Traffic: {e['texts']}, one input per request, each request's task drawn uniformly at random; "
                   f"batches of {e['batch']}; tasks are random bias sets of the real shape (26,112-value delta + "
                   f"2-label head). Compared variants run in the same rounds in a rotating order; every ratio is "
                   f"the median over rounds of the per-round ratio ({r['sizes']['rounds']} rounds in process, "
                   f"{r['sizes']['http_rounds']} through HTTP). Absolute times are printed for scale only.\n")
    out.append("### Verdict against the goals\n")
    out.append(_table(["goal", "measured", "verdict"], [list(v) for v in verdicts(r)]) + "\n")

    if e:
        s = e["swap"]
        out.append("### 1. Swap cost\n")
        out.append(f"One swap = copying one task's row ({s['bytes']:,} bytes) from a bank of "
                   f"{max(r['sizes']['tasks']):,} tasks into the flat buffer the bias parameters view (rows drawn at "
                   f"random); median of {r['sizes']['swap_rounds']} blocks of {r['sizes']['swaps_per_block']} swaps, "
                   f"against a swap-mode forward (tokenised batch, no swap) measured in the same rounds.\n")
        out.append(_table(["batch", "tokens (padded)", "forward ms", "swap µs", "swap / forward"],
                          [[b, v["tokens"], f"{v['forward_ms']:.1f}", f"{s['swap_us']:.1f}", f"{v['ratio'] * 100:.4f} %"]
                           for b, v in s["batches"].items()]) + "\n")
    if e or h:
        out.append("### 2. Mixed-task throughput, as a ratio to single-task traffic\n")
        out.append("*gather* is the default policy (one task in a batch: swap; several: one forward adding each "
                   "row's biases); *swap-only* runs a mixed batch as one swap forward per task present "
                   "(`BITFIT_GROUP_MAX_TASKS` set very high). Engine alone = tokenise + choose the mode + run, in "
                   "process; HTTP = `bitfit serve` processes with "
                   + (f"{h['concurrency']} concurrent closed-loop clients, {h['requests_per_phase']} requests a phase"
                      if h else "–") + ".\n")
        ts = sorted(set((_tasks(e["ratio_to_single"], "gather T=") if e else [])
                        + (_tasks(h["ratio_to_single"], "http gather T=") if h else [])) | {1})
        rows = []
        for t in ts:
            def g(src, key):
                v = src["ratio_to_single"].get(key) if src else None
                return "–" if v is None else f"{v:.3f}"
            ek = "ours T=1" if t == 1 else f"gather T={t}"
            ek2 = "ours T=1" if t == 1 else f"swap-only T={t}"
            rows.append([f"{t:,}", g(e, ek), g(e, ek2), g(h, f"http gather T={t}"), g(h, f"http swap-only T={t}")])
        out.append(_table(["tasks", "engine, gather", "engine, swap-only", "HTTP, gather", "HTTP, swap-only"], rows))
        scale = []
        if e:
            scale.append(f"engine single-task {e['throughput']['ours T=1']['median']:.1f} seq/s")
        if h:
            scale.append(f"HTTP single-task {h['throughput']['http gather T=1']['median']:.1f} seq/s (gather server), "
                         f"{h['throughput']['http swap-only T=1']['median']:.1f} seq/s (swap-only server)")
        out.append("\nFor scale: " + "; ".join(scale) + ".\n")
        if h and h.get("batches"):
            out.append("Forward passes the servers ran in these phases, warm-up included (their `/metrics`): " + "; ".join(
                f"{name}: " + ", ".join(f"{m} {v['batches']} × {v['mean_inputs']:.1f} inputs" for m, v in st.items())
                for name, st in h["batches"].items()) + ".\n")
    if m:
        out.append("### 3. Memory per resident task\n")
        out.append("Each row is a separate child process (`bench/serving_memory.py --kind KIND`): RSS after loading "
                   "the backbone and running one forward (0 tasks), then after loading the tasks. Bytes per task = "
                   "RSS growth / tasks; raw = the bytes of one task's tensors.\n")
        rows = []
        for kind, label in (("bank", "ours, as shipped"), ("bank-doubling", "ours before: table doubling"),
                            ("peft", "PEFT LoRA r=8 q/v (adapter only)"), ("copies", "one model copy per task")):
            d = m.get(kind)
            if not d:
                continue
            for p in d["points"]:
                rows.append([label, f"{p['count']:,}", _mib(p["rss"]),
                             f"{p['bank_rows']:,}" if "bank_rows" in p else "–", _kib(p["per_task"]),
                             _kib(d["raw_bytes_per_task"]),
                             "–" if p["per_task_x_raw"] is None else f"{p['per_task_x_raw']:.2f}×"])
        out.append(_table(["what", "tasks", "RSS MiB", "bank table rows", "KiB per task", "raw KiB per task",
                           "per task / raw"], rows) + "\n")
    if h and "upload" in h:
        out.append("### 4. Upload → live\n")
        out.append("A new version of one task uploaded with `PUT /tasks/live`, then `POST /predict` (one input) until "
                   "the answer names the new version; the same prediction is timed just before each upload, for "
                   f"scale. Median of {h['upload']['reps']} uploads per server.\n")
        rows = []
        for key in ("upload", "upload_small"):
            u = h.get(key)
            if u:
                rows.append([f"{u['resident_tasks']:,}", f"{u['put_ms']:.1f}", f"{u['live_ms']:.1f}",
                             f"{u['predict_ms']:.1f}", f"{u['total_ms']:.1f}", f"{u['total_max_ms']:.1f}",
                             u["predicts_until_live_max"]])
        out.append(_table(["resident tasks", "PUT sent → 201 ms", "201 → first answer by the new version ms",
                           "a prediction alone ms", "total ms (median)", "total ms (max)", "predicts until live (max)"],
                          rows) + "\n")
        n = max(r["sizes"]["http_tasks"])
        out.append(f"Where the time goes, measured in the same run: `BiasStore.put` took {h['store_fill_s'] / n * 1e3:.0f} ms "
                   f"per bias set on average while filling the store ({n:,} puts, beside the memory probes), and "
                   f"`BiasStore.active_versions()` — which `TaskService.put` runs through `sync(force=True)` before "
                   f"it answers — took {h.get('store_scan_ms', float('nan')):.0f} ms on the {n:,}-task store.\n")
    if e:
        out.append("### 5. Against the peers, same traffic\n")
        tp = e["throughput"]
        rows = []
        mem = {}
        if m:
            for kind in ("bank", "peft", "copies"):
                pts = [p for p in m.get(kind, {}).get("points", []) if p["count"]]
                if pts:
                    mem[kind] = pts[-1]
        for t, ratio in e["ours_over_peft"].items():
            rows.append([f"PEFT multi-LoRA, {t} tasks", f"{tp[f'gather T={t}']['median']:.1f}",
                         f"{tp[f'peft T={t}']['median']:.1f}", f"{ratio:.2f}×"])
        for t, ratio in e["ours_over_copies"].items():
            rows.append([f"one model copy per task, {t} tasks", f"{tp[f'gather T={t}']['median']:.1f}",
                         f"{tp[f'copies T={t}']['median']:.1f}", f"{ratio:.2f}×"])
        rl = e["reload"]
        rows.append([f"reload a fine-tuned model per request batch (one task per batch of {e['batch']})",
                     f"{rl['throughput']['ours, swap per batch']['median']:.1f} (swap every batch)",
                     f"{rl['throughput']['reload per batch']['median']:.1f}", f"{rl['ours_over_reload']:.2f}×"])
        out.append(_table(["peer", "ours seq/s", "peer seq/s", "ours / peer (median of rounds)"], rows) + "\n")
        if mem:
            out.append("Memory per task (from 3): " + "; ".join(
                f"{k} {_kib(p['per_task'])} KiB at {p['count']:,}" for k, p in
                (("ours", mem.get("bank")), ("PEFT", mem.get("peft")), ("model copy", mem.get("copies"))) if p) + ".\n")
    if h:
        out.append("### 6. HTTP overhead\n")
        lat = h["latency"]
        out.append(_table(["HTTP saturation / engine alone (single task)", "latency at half of saturation",
                           "p50 ms", "p90 ms", "p99 ms", "max ms"],
                          [[f"{h['overhead']:.3f}×", f"{lat['rate']:.1f} req/s Poisson, {lat['requests']} requests",
                            f"{lat['p50_ms']:.1f}", f"{lat['p90_ms']:.1f}", f"{lat['p99_ms']:.1f}",
                            f"{lat['max_ms']:.1f}"]]) + "\n")
        out.append(f"Server RSS with {max(r['sizes']['http_tasks']):,} tasks resident: "
                   f"{_mib(h['server_rss']['gather'])} MiB (gather server), {_mib(h['server_rss']['swap-only'])} MiB "
                   f"(swap-only server), {_mib(h['server_rss']['small'])} MiB with none (the server's own figure for "
                   f"memory per task: RSS difference / tasks); all three were ready {h['ready_s']['gather']:.0f} s "
                   f"after the memory probes ended (they loaded beside them); writing the {max(r['sizes']['http_tasks']):,} tasks into the store took "
                   f"{h['store_fill_s']:.0f} s (`BiasStore.put`, fsync-bound, beside the memory probes).\n")
    if png:
        out.append(f"![serving benchmark]({png})\n")
    return "\n".join(out)


def console(r: dict) -> str:
    return markdown(r)


def write_block(path: Path, block: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace the block between `begin` and `end` in `path` (or append it), keeping everything outside them."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    new = f"{begin}\n{block.rstrip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: new, text)
    else:
        text = text.rstrip() + "\n\n" + new + "\n"
    path.write_text(text, encoding="utf-8")


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    e, m, h = r.get("engine"), r.get("memory"), r.get("http")
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    ax = axes[0]
    for src, key, label, style in ((e, "gather T=", "engine, gather", "o-"), (e, "swap-only T=", "engine, swap-only", "o--"),
                                   (h, "http gather T=", "HTTP, gather", "s-"), (h, "http swap-only T=", "HTTP, swap-only", "s--"),
                                   (e, "peft T=", "PEFT multi-LoRA", "^:"), (e, "copies T=", "model copy per task", "v:")):
        if not src:
            continue
        ts = _tasks(src["ratio_to_single"], key)
        ratios = [src["ratio_to_single"][f"{key}{t}"] for t in ts]
        base = [] if "peft" in key or "copies" in key else [1]
        ax.plot(([1] if base else []) + ts, base + ratios, style, label=label)
    ax.axhline(GOALS["mixed_100"], color="grey", lw=0.8, ls=":")
    ax.set_xscale("log")
    ticks = sorted({1, *(_tasks(e["ratio_to_single"], "gather T=") if e else []),
                    *(_tasks(h["ratio_to_single"], "http gather T=") if h else [])})
    ax.set_xticks(ticks, [f"{t:,}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("tasks in the traffic (uniform)")
    ax.set_ylabel("throughput / our single-task throughput")
    ax.set_title("mixed-task throughput")
    ax.legend(fontsize=8)
    ax = axes[1]
    if m:
        labels, vals, raws = [], [], []
        for kind, name in (("bank", "ours"), ("bank-doubling", "ours before\n(doubling)"), ("peft", "PEFT"), ("copies", "copy")):
            d = m.get(kind)
            for p in (d or {}).get("points", []):
                if p["count"]:
                    labels.append(f"{name}\n{p['count']:,}")
                    vals.append(p["per_task"] / 1024)
                    raws.append(d["raw_bytes_per_task"] / 1024)
        ax.bar(range(len(vals)), vals, color="tab:blue", label="measured (RSS growth / tasks)")
        ax.scatter(range(len(raws)), raws, color="black", marker="_", s=400, zorder=3, label="raw tensor bytes")
        ax.set_xticks(range(len(vals)), labels, fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("KiB per resident task")
        ax.legend(fontsize=8)
    ax.set_title("memory per task")
    ax = axes[2]
    if e:
        names, vals = [], []
        for t, v in e["ours_over_peft"].items():
            names.append(f"vs PEFT\n{t} tasks")
            vals.append(v)
        for t, v in e["ours_over_copies"].items():
            names.append(f"vs copies\n{t} tasks")
            vals.append(v)
        names.append("vs reload\nper batch")
        vals.append(e["reload"]["ours_over_reload"])
        bars = ax.bar(range(len(vals)), vals, color="tab:green")
        ax.bar_label(bars, [f"{v:.2f}×" for v in vals], fontsize=8)
        ax.axhline(1, color="grey", lw=0.8)
        ax.axhline(GOALS["over_peft"], color="grey", lw=0.8, ls=":", label=f"goal vs PEFT: {GOALS['over_peft']:.0f}×")
        ax.set_xticks(range(len(vals)), names, fontsize=8)
        ax.set_yscale("log")
        top = max(vals + [GOALS["over_peft"]]) * 1.3
        ticks = [v for v in (0.5, 1, 1.5, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000) if min(vals + [1]) * 0.8 <= v <= top]
        ax.set_ylim(min(vals + [1]) * 0.8, top)
        ax.set_yticks(ticks, [f"{v:g}×" for v in ticks])
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_ylabel("our throughput / peer throughput")
        ax.legend(fontsize=8)
    ax.set_title("against the peers (same traffic)")
    fig.suptitle(f"bench/serving.py — {r['date']}, {r['machine']['cores']} cores, {r['machine']['threads']} thread(s)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
