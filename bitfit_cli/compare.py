"""`bitfit compare`: run the method comparison on GLUE (resumable), then write its tables and plot."""

from __future__ import annotations

import os
from pathlib import Path

GLUE_DEFAULT = Path(os.environ.get("BITFIT_GLUE_DIR", Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"))
RESULTS_DIR = Path("bench/results")


def add_commands(sub) -> None:
    from bitfit.compare import METHOD_ORDER, PRESETS, TASKS

    p = sub.add_parser("compare", help="compare training methods on GLUE tasks (resumable; each run in a fresh process)")
    p.add_argument("--preset", choices=tuple(PRESETS), default="full",
                   help="quick: 256 train examples, 1 epoch, default lrs (under 20 min); medium: 1,000 train examples, "
                        "3 epochs, lrs chosen on dev (about 2.5 h with --jobs 2); full: whole train splits (SST-2: 20,000), "
                        "3 epochs, lrs chosen on a held-out 10 %% of train, two seeds on RTE and MRPC (about 16 CPU hours); "
                        "costs: 20 steps per method and task, for step time and peak memory side by side. Default: %(default)s")
    p.add_argument("--quick", action="store_const", const="quick", dest="preset", help="same as --preset quick")
    p.add_argument("--glue", default=str(GLUE_DEFAULT), help="folder holding the GLUE task folders (default: %(default)s)")
    p.add_argument("--backbone", help="local Hugging Face model directory (default: the packaged all-MiniLM-L6-v2)")
    p.add_argument("--device", default="cpu", help="where every run trains: cpu (default), cuda, cuda:1, ...")
    p.add_argument("--methods", default=",".join(METHOD_ORDER), help="comma-separated (default: %(default)s)")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated (default: %(default)s)")
    p.add_argument("--lrs", help="'default' (each method's), 'grid' (each method's grid) or comma-separated values "
                   "for every method (default: grid, or default with the quick and costs presets)")
    p.add_argument("--seeds", help="seeds per task: N for every task, or TASK=N,... (default: the preset's; full: rte=2,mrpc=2)")
    p.add_argument("--results", help="results JSON; a rerun resumes it (default: bench/results/compare_PRESET.json)")
    p.add_argument("--costs", help="results JSON of a costs run, whose step times and peak memory the report shows "
                   "(default for full: bench/results/compare_costs.json where it exists)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--max-train", type=int)
    p.add_argument("--max-dev", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--max-length", type=int)
    p.add_argument("--threads", type=int, help="torch threads per run (default: 1)")
    p.add_argument("--seed", type=int, help="the first seed (default: 0)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time, each in its own process (default: 1)")
    p.add_argument("--timeout", type=float, help="seconds one run may take before it is recorded as failed")
    p.add_argument("--report-only", action="store_true", help="train nothing: write the tables and plot from the results")
    p.add_argument("--dry-run", action="store_true", help="list the runs still to do and stop")
    p.add_argument("--markdown", help="tables file (default: beside the results, .md)")
    p.add_argument("--plot", help="PNG plot (default: beside the results, .png)")
    p.set_defaults(func=cmd_compare)


def settings_from(args):
    from bitfit.compare import PRESETS, with_overrides

    return with_overrides(PRESETS[args.preset], **{k: getattr(args, k) for k in (
        "epochs", "max_train", "max_dev", "batch_size", "max_length", "threads", "seed")})


def parse_seeds(text: str | None, tasks: list[str]) -> dict[str, int] | None:
    if text is None:
        return None
    try:
        if "=" not in text:
            return {t: int(text) for t in tasks}
        return {t.strip(): int(n) for t, n in (part.split("=") for part in text.split(","))}
    except ValueError:
        raise ValueError(f"--seeds must be N or TASK=N,... (e.g. rte=2,mrpc=2), not {text!r}") from None


def parse_lrs(text: str | None, mode: str):
    lrs = text or ("default" if mode in ("quick", "costs") else "grid")
    if lrs in ("default", "grid"):
        return lrs
    try:
        return [float(v) for v in lrs.split(",")]
    except ValueError:
        raise ValueError(f"--lrs must be 'default', 'grid' or comma-separated numbers, not {text!r}") from None


def cmd_compare(args) -> int:
    from bitfit.compare import PRESET_GRIDS, PRESET_SEEDS, load_results, make_plan, run_all
    from bitfit.compare_child import check_device
    from bitfit.compare_summary import summarise
    from bitfit_cli.compare_report import plot, render_markdown

    # every option is checked before anything is loaded, trained or written
    settings = settings_from(args)
    mode = args.preset
    if args.jobs < 1:
        raise ValueError(f"--jobs must be at least 1, not {args.jobs}")
    results_path = Path(args.results or RESULTS_DIR / f"compare_{mode}.json")
    tasks = args.tasks.split(",")
    seeds = parse_seeds(args.seeds, tasks)
    plan = make_plan(args.methods.split(","), tasks, parse_lrs(args.lrs, mode), settings, args.glue, args.backbone,
                     grids=PRESET_GRIDS.get(mode), seeds=PRESET_SEEDS.get(mode) if seeds is None else seeds,
                     device=args.device)
    if not args.report_only and not args.dry_run:
        check_device(args.device)
    costs_path = Path(args.costs) if args.costs else RESULTS_DIR / "compare_costs.json" if mode == "full" else None
    if args.dry_run:
        results = load_results(results_path, settings)
        runs = plan.runs(results)
        for r in runs:
            print(("done  " if r.key in results["runs"] else "to do ") + r.key)
        if settings.select_share:
            # a pair with one candidate needs no selection, so its final is never waiting
            finals = {(r.method, r.task) for r in runs if r.stage == "final"}
            waiting = sum(1 for m in plan.methods for t in plan.tasks if len(plan.lrs[m]) > 1 and (m, t) not in finals)
            print(f"{waiting} (method, task) finals wait for their learning-rate selection")
        return 0
    if args.report_only:
        results = load_results(results_path, settings)
    else:
        print(f"settings: {settings}; device {args.device}")
        results = run_all(plan, results_path, log_path=results_path.with_suffix(".log"), timeout=args.timeout,
                          jobs=args.jobs)
    costs = None
    if mode == "costs":  # its own runs are the side-by-side measurement
        costs, costs_path = results, results_path
    elif costs_path is not None and costs_path != results_path and costs_path.exists():
        import json

        costs = json.loads(costs_path.read_text())
    summary = summarise(results, costs)
    table = render_markdown(summary, results, costs, costs_path if costs else None, score_goals=mode != "costs")
    md = Path(args.markdown or results_path.with_suffix(".md"))
    md.write_text(table)
    print(table)
    png = Path(args.plot or results_path.with_suffix(".png"))
    if summary["methods"]:
        plot(summary, png, title=f"{args.backbone or 'MiniLM'} on GLUE dev ({mode})")
        print(f"wrote {md} and {png}")
    return 0
