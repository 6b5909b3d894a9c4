"""The comparison's report: markdown tables (scores ± SE, % of full, costs, goals) and one plot."""

from __future__ import annotations

from pathlib import Path

METRIC_NAMES = {"accuracy": "acc", "f1": "F1", "matthews": "MCC", "pearson": "Pearson"}


def _mib(n) -> str:
    return "–" if n is None else f"{n / 2**20:,.0f}"


def _num(v, fmt="{:.1f}") -> str:
    return "–" if v is None else fmt.format(v)


def _pm(v, se, fmt="{:.1f}") -> str:
    return "–" if v is None else fmt.format(v) + ("" if se is None else " ± " + fmt.format(se))


def _count(n) -> str:
    return "–" if n is None else f"{n:,}"


def _x(v) -> str:
    return "–" if v is None else f"{v:.2f}×"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def _metrics(summary: dict) -> dict[str, str]:
    """task -> the metric its cells report (every method's cell of a task reports the same one)."""
    return {t: next(r["cells"][t]["metric"] for r in summary["rows"].values() if t in r["cells"]) for t in summary["tasks"]}


def _lr_caption(chosen_on: set[str]) -> str:
    parts = [f"chosen on {c}" for c in sorted(chosen_on - {"given"})]
    if "given" in chosen_on:
        parts.append("given by --lrs (one candidate, nothing chosen)")
    return "Learning rate " + (" and ".join(parts) or "–") + " (per method and task)."


def render_markdown(summary: dict, results: dict, costs: dict | None = None, costs_path: Path | None = None,
                    score_goals: bool = True) -> str:
    """The tables; `score_goals=False` (the costs preset: 20 steps) lists only the cost goals."""
    from bitfit.compare import TASKS

    rows, tasks, methods = summary["rows"], summary["tasks"], summary["methods"]
    finals = [e for e in results["runs"].values() if e.get("stage", "final") == "final"]
    selects = len(results["runs"]) - len(finals)
    any_run = next(iter(results["runs"].values()), None)
    cells = {(m, t): c for m in methods for t, c in rows[m]["cells"].items()}
    chosen_on = {c["chosen_on"] for c in cells.values()}
    metric = _metrics(summary)
    out = [f"Settings: `{results['settings']}`; {len(finals)} final runs" + (f" and {selects} learning-rate selection runs" if selects else "")
           + (f", torch {any_run['torch']}, {any_run['threads']} thread(s) per run, device {any_run.get('device', 'cpu')}"
              if any_run else "") + (f", backbone {any_run['backbone']}" if any_run and "backbone" in any_run else "") + ".",
           "", "Scores ×100 on the whole of each dev set given in the settings; ± is one standard error (bootstrap over dev "
           "examples; binomial for accuracy where no predictions were stored). "
           + _lr_caption(chosen_on)
           + (" Runs report their last epoch (dev chooses nothing)." if results["settings"].get("keep") == "last"
              else " Runs report their best epoch on dev."), ""]
    head = ["method", "trainable", "share %"] + [f"{TASKS[t]} {METRIC_NAMES.get(metric[t], metric[t])}" for t in tasks]
    head += ["average", "% of full"]
    body = []
    for m in methods:
        r = rows[m]
        body.append([m, f"{r['trainable']:,}", f"{100 * r['share']:.3f}"]
                    + [_pm(r["cells"][t]["score"], r["cells"][t]["se"]) if t in r["cells"] else "–" for t in tasks]
                    + [_pm(r["average"], r["average_se"]), _pm(r["pct_full"], r["pct_full_se"])])
    out += _table(head, body)

    out += ["", "Per method and task: the mean over seeds (each seed's score), the learning rate reported and how it was "
            "chosen (held-out scores of the candidates), and the dev score after each epoch (first seed):", ""]
    head = ["method", "task", "metric", "score ± SE", "seeds", "lr", "chosen on (candidates)", "dev by epoch",
            "train ex.", "dev ex.", "steps"]
    body = []
    for m in methods:
        for t in tasks:
            c = rows[m]["cells"].get(t)
            if c is None:
                continue
            e = c["runs"][0]
            cand = ", ".join(f"{lr:g}: {s:.1f}" for lr, s in sorted(c["select_scores"].items())) or \
                ", ".join(f"{v:g}" for v in c["lrs_tried"])
            epochs = " / ".join(f"{100 * h[c['metric']]:.1f}" for h in e.get("history", []))
            body.append([m, TASKS[t], c["metric"], _pm(c["score"], c["se"]),
                         " / ".join(f"{s:.1f}" for s in c["seed_scores"]), f"{c['lr']:g}", f"{c['chosen_on']} ({cand})",
                         epochs, _count(e.get("train_examples")), _count(e.get("dev_examples")), str(e["steps"])])
    out += _table(head, body)

    out += selection_table(results)
    costs_rows = summary["costs"]
    if costs_rows:
        source = (f"a side-by-side run of the costs preset (`{costs_path}`, settings `{costs['settings']}`: every method "
                  "on the same batches of each task, one child process at a time)" if summary["separate_costs"] and costs_path
                  else "the reported runs themselves (runs shared the machine, so ratios are rough)")
        out += ["", f"Costs, from {source}; means over tasks, and the mean of the per-task ratios to full FT. CPU s/step "
                "is the process's CPU time per step, which a busy machine does not stretch (the goal uses it where recorded):", ""]
        head = ["method", "CPU s/step", "× full", "wall s/step", "× full", "peak RSS MiB", "× full", "RSS growth MiB",
                "× full", "optimizer state MiB"]
        out += _table(head, [[m, _num(c["step_cpu_seconds"], "{:.3f}"), _x(c["step_cpu_seconds_ratio"]),
                              _num(c["step_seconds"], "{:.3f}"), _x(c["step_seconds_ratio"]), _mib(c["peak_rss"]),
                              _x(c["peak_rss_ratio"]), _mib(c["rss_growth"]), _x(c["rss_growth_ratio"]),
                              _num(c["optimizer_bytes"] / 2**20, "{:.2f}")] for m, c in costs_rows.items()])
        out += ["", "CPU seconds per step, per task (the same batches for every method):", ""]
        ctasks = [t for t in TASKS if any(t in c["per_task"] for c in costs_rows.values())]
        out += _table(["method"] + [TASKS[t] for t in ctasks],
                      [[m] + [_num(c["per_task"].get(t, {}).get("step_cpu_seconds"), "{:.3f}") for t in ctasks]
                       for m, c in costs_rows.items()])

    out += ["", "Goals:", ""]
    for g in summary["goals"]:
        if not score_goals and g["unit"] == "points" or not score_goals and "average" in g["goal"]:
            continue
        if g["value"] is None:
            value = "not measured"
        elif g["unit"] == "points":
            value = f"{g['value']:+.2f} points" + ("" if g["se"] is None else f" (SE {g['se']:.2f})")
        else:
            value = f"{g['value']:.3f}" + ("" if g["se"] is None else f" (SE {g['se']:.3f})")
        out.append(f"- {g['goal']}: {value} — **{ {True: 'met', False: 'missed', None: 'pending'}[g['met']] }**")
    if results.get("failed"):
        out += ["", "Failed runs (retried by a rerun): " + ", ".join(sorted(results["failed"]))]
    return "\n".join(out) + "\n"


def selection_table(results: dict) -> list[str]:
    """Each selection run's held-out score per method and task, the chosen candidate in bold (empty without selection)."""
    from bitfit.compare import METHOD_ORDER, TASKS, chosen_lr

    by: dict[tuple[str, str], list[dict]] = {}
    for e in results["runs"].values():
        if e.get("stage") == "select":
            by.setdefault((e["method"], e["task"]), []).append(e)
    if not by:
        return []
    tasks = [t for t in TASKS if any(k[1] == t for k in by)]
    methods = [m for m in METHOD_ORDER if any(k[0] == m for k in by)]

    def cell(m, t):
        runs = sorted(by.get((m, t), []), key=lambda e: e["lr"])
        if not runs:
            return "–"
        best = chosen_lr(runs)
        return ", ".join((f"**{e['lr']:g}: {100 * e['score']:.1f}**" if e["lr"] == best else f"{e['lr']:g}: {100 * e['score']:.1f}")
                         for e in runs)

    steps = next(iter(by.values()))[0]
    return ["", f"Learning-rate selection on the held-out slice of train ({steps['train_examples']:,} training examples, "
            f"{steps['steps']} steps per candidate; the better one in bold):", ""] + \
        _table(["method"] + [TASKS[t] for t in tasks], [[m] + [cell(m, t) for t in tasks] for m in methods])


def plot(summary: dict, path: Path, title: str) -> None:
    """Left: average dev score (± SE) against the trainable share (log x), one marker per method, tasks faint
    behind. Right: each task's score per method (± SE), so a method's loss can be traced to its task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bitfit.compare import TASKS

    methods, tasks, metric = summary["methods"], summary["tasks"], _metrics(summary)
    fig, (ax, bars) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1, 1.25]})
    colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    for m in methods:
        r = summary["rows"][m]
        x = 100 * r["share"]
        ax.scatter([x] * len(r["scores"]), list(r["scores"].values()), alpha=0.25, s=18, color=colors[m])
        if r["average"] is not None:
            # a legend, not labels beside the markers: BitFit and random share one x, bq-bm2 and ia3 nearly
            ax.errorbar([x], [r["average"]], yerr=[r["average_se"] or 0], fmt="o", color=colors[m], ms=8,
                        mec="black", capsize=3, zorder=3, label=f"{m} ({x:.3g} %): {r['average']:.1f}")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (% of the model, log scale)")
    ax.set_ylabel("GLUE dev score (average ± SE: large markers; tasks: faint)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right", title="method (trainable): average", title_fontsize=8)
    width = 0.8 / max(len(methods), 1)
    for i, m in enumerate(methods):
        cells_ = summary["rows"][m]["cells"]
        xs = [j + (i - (len(methods) - 1) / 2) * width for j, t in enumerate(tasks) if t in cells_]
        ys = [cells_[t]["score"] for t in tasks if t in cells_]
        errs = [cells_[t]["se"] or 0 for t in tasks if t in cells_]
        bars.bar(xs, ys, width, yerr=errs, color=colors[m], capsize=2, label=m, error_kw={"lw": 0.8})
    bars.set_xticks(range(len(tasks)), [f"{TASKS[t]}\n{METRIC_NAMES.get(metric[t], metric[t])}" for t in tasks])
    bars.set_ylabel("dev score ± SE")
    bars.set_title("per task")
    bars.grid(True, axis="y", alpha=0.3)
    bars.legend(fontsize=8, ncol=len(methods), loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)

