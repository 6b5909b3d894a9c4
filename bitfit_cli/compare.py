"""`bitfit compare`: run the method comparison on GLUE (resumable), then write its tables and plot."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

GLUE_DEFAULT = Path(os.environ.get("BITFIT_GLUE_DIR", Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"))
RESULTS_DIR = Path("bench/results")

METRIC_NAMES = {"accuracy": "acc", "f1": "F1", "matthews": "MCC", "pearson": "Pearson"}


def add_commands(sub) -> None:
    from bitfit.compare import METHOD_ORDER, TASKS

    p = sub.add_parser("compare", help="compare training methods on GLUE tasks (resumable; each run in a fresh process)")
    p.add_argument("--preset", choices=("quick", "medium", "full"), default="full",
                   help="quick: 256 train examples, 1 epoch, default lrs (under 20 min); medium: 1,000 train examples, "
                        "3 epochs, a small lr grid per method (about 2.5 h with --jobs 2 on 2 cores); full: whole train splits "
                        "(days). Default: %(default)s")
    p.add_argument("--quick", action="store_const", const="quick", dest="preset", help="same as --preset quick")
    p.add_argument("--glue", default=str(GLUE_DEFAULT), help="folder holding the GLUE task folders (default: %(default)s)")
    p.add_argument("--backbone", help="local Hugging Face model directory (default: the packaged all-MiniLM-L6-v2)")
    p.add_argument("--methods", default=",".join(METHOD_ORDER), help="comma-separated (default: %(default)s)")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated (default: %(default)s)")
    p.add_argument("--lrs", help="'default' (each method's), 'grid' (each method's grid) or comma-separated values "
                   "for every method (default: grid, or default with --quick)")
    p.add_argument("--results", help="results JSON; a rerun resumes it (default: bench/results/compare_PRESET.json)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--max-train", type=int)
    p.add_argument("--max-dev", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--max-length", type=int)
    p.add_argument("--threads", type=int, help="torch threads per run (default: 1)")
    p.add_argument("--seed", type=int)
    p.add_argument("--jobs", type=int, default=1, help="runs at a time, each in its own process (default: 1)")
    p.add_argument("--timeout", type=float, help="seconds one run may take before it is recorded as failed")
    p.add_argument("--report-only", action="store_true", help="train nothing: write the tables and plot from the results")
    p.add_argument("--dry-run", action="store_true", help="list the runs still to do and stop")
    p.add_argument("--markdown", help="tables file (default: beside the results, .md)")
    p.add_argument("--plot", help="PNG plot (default: beside the results, .png)")
    p.set_defaults(func=cmd_compare)


def settings_from(args):
    from bitfit.compare import PRESETS

    base = PRESETS[args.preset]
    overrides = {k: getattr(args, k) for k in ("epochs", "max_train", "max_dev", "batch_size", "max_length", "threads", "seed")
                 if getattr(args, k) is not None}
    return replace(base, **overrides)


def cmd_compare(args) -> int:
    from bitfit.compare import MEDIUM_GRIDS, load_results, plan, run_all, summarise

    settings = settings_from(args)
    mode = args.preset
    if args.jobs < 1:
        raise ValueError(f"--jobs must be at least 1, not {args.jobs}")
    results_path = Path(args.results or RESULTS_DIR / f"compare_{mode}.json")
    lrs = args.lrs or ("default" if mode == "quick" else "grid")
    if lrs not in ("default", "grid"):
        try:
            lrs = [float(v) for v in lrs.split(",")]
        except ValueError:
            raise ValueError(f"--lrs must be 'default', 'grid' or comma-separated numbers, not {args.lrs!r}") from None
    runs = plan(args.methods.split(","), args.tasks.split(","), lrs, settings, args.glue, args.backbone,
                grids=MEDIUM_GRIDS if mode == "medium" else None)
    if args.dry_run:
        done = load_results(results_path, settings)["runs"]
        for r in runs:
            print(("done  " if r.key in done else "to do ") + r.key)
        return 0
    if args.report_only:
        results = load_results(results_path, settings)
    else:
        print(f"settings: {settings}")
        results = run_all(runs, results_path, log_path=results_path.with_suffix(".log"), timeout=args.timeout,
                          jobs=args.jobs)
    summary = summarise(results)
    table = render_markdown(summary, results)
    md = Path(args.markdown or results_path.with_suffix(".md"))
    md.write_text(table)
    print(table)
    png = Path(args.plot or results_path.with_suffix(".png"))
    if summary["methods"]:
        plot(summary, png, title=f"{args.backbone or 'MiniLM'} on GLUE dev ({mode})")
        print(f"wrote {md} and {png}")
    return 0


# ---------------------------------------------------------------------------------------------
# Tables and plot


def _mib(n) -> str:
    return "–" if n is None else f"{n / 2**20:,.0f}"


def _num(v, fmt="{:.1f}") -> str:
    return "–" if v is None else fmt.format(v)


def render_markdown(summary: dict, results: dict) -> str:
    from bitfit.compare import TASKS

    rows, tasks, methods = summary["rows"], summary["tasks"], summary["methods"]
    any_run = next(iter(results["runs"].values()), None)
    metric = {t: next((r["runs"][t]["metric"] for r in rows.values() if t in r["runs"]), "") for t in tasks}
    full_avg = rows.get("full", {}).get("average")
    out = [f"Settings: `{results['settings']}`; {len(results['runs'])} runs"
           + (f", torch {any_run['torch']}, {any_run['threads']} thread(s) per run" if any_run else "")
           + (f", backbone {any_run['backbone']}" if any_run and "backbone" in any_run else "") + ".", ""]
    head = ["method", "trainable", "share %"] + [f"{TASKS[t]} {METRIC_NAMES.get(metric[t], metric[t])}" for t in tasks]
    head += ["average", "% of full", "s/step", "peak RSS MiB", "RSS growth MiB", "optimizer state MiB"]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        r = rows[m]
        pct = 100 * r["average"] / full_avg if r["average"] is not None and full_avg else None
        cells = [m, f"{r['trainable']:,}", f"{100 * r['share']:.3f}"] + [_num(r["scores"].get(t)) for t in tasks]
        cells += [_num(r["average"]), _num(pct), _num(r["step_seconds"], "{:.3f}"), _mib(r["peak_rss"]),
                  _mib(r["rss_growth"]), _num(r["optimizer_bytes"] / 2**20, "{:.2f}")]
        out.append("| " + " | ".join(cells) + " |")
    out += ["", "Per method and task (the learning rate chosen on dev, of those tried):", ""]
    head = ["method", "task", "metric", "score", "lr (tried)", "best epoch", "steps", "s/step", "peak RSS MiB",
            "RSS growth MiB", "optimizer state MiB"]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        for t in tasks:
            e = rows[m]["runs"].get(t)
            if e is None:
                continue
            tried = ", ".join(f"{v:g}" for v in rows[m]["lrs_tried"][t])
            growth = e["peak_rss"] - e["rss_before"] if e.get("rss_before") else None
            out.append("| " + " | ".join([
                m, TASKS[t], e["metric"], f"{100 * e['score']:.1f}", f"{e['lr']:g} ({tried})", str(e["best_epoch"]),
                str(e["steps"]), f"{e['step_seconds']:.3f}", _mib(e["peak_rss"]), _mib(growth),
                f"{e['optimizer_bytes'] / 2**20:.2f}"]) + " |")
    out += ["", "Goals:", ""]
    for g in summary["goals"]:
        value = "not measured" if g["value"] is None else (
            f"{g['value']:+.2f} points" if g["unit"] == "points" else f"{g['value']:.3f}")
        verdict = {True: "met", False: "missed", None: "pending"}[g["met"]]
        out.append(f"- {g['goal']}: {value} — **{verdict}**")
    if results.get("failed"):
        out += ["", "Failed runs (retried by a rerun): " + ", ".join(sorted(results["failed"]))]
    return "\n".join(out) + "\n"


def plot(summary: dict, path: Path, title: str) -> None:
    """Average dev score against the trainable share (log x), one marker per method, tasks faint behind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, m in enumerate(summary["methods"]):
        r = summary["rows"][m]
        x = 100 * r["share"]
        line = ax.scatter([x] * len(r["scores"]), list(r["scores"].values()), alpha=0.25, s=18)
        if r["average"] is not None:
            ax.scatter([x], [r["average"]], color=line.get_facecolor()[0][:3], s=70, edgecolor="black", zorder=3)
            # alternate above and below: BitFit and random share one x
            ax.annotate(m, (x, r["average"]), textcoords="offset points", xytext=(6, 6 if i % 2 else -14))
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (% of the model, log scale)")
    ax.set_ylabel("GLUE dev score (average: large markers; tasks: faint)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
