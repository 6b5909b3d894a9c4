"""CPU hours a comparison preset will take, from the step times of a costs run.

    .venv/bin/python bench/compare_plan.py                       # the full preset, from bench/results/compare_costs.json
    .venv/bin/python bench/compare_plan.py --preset medium

Per (method, task): the CPU seconds of one training step (process time, so a busy machine does not inflate it)
× the steps of each selection and final run, plus dev evaluation (a forward pass ≈ a third of full FT's
step per example, after every epoch) and the start of each child process (imports, backbone, data). Prints
one table (method × task: candidates, seeds, hours) with the command that produced it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STARTUP_S = 12.0  # CPU seconds to start a child: Python, torch, tokenizer, backbone, the task's files
EVAL_SHARE = 1 / 3  # a forward pass of one example, as a share of full FT's training cost per example


def sizes(glue: Path, task: str) -> tuple[int, int]:
    from bitfit.compare import TASKS

    folder = glue / TASKS[task]
    count = lambda f: sum(1 for line in (folder / f).open(encoding="utf-8") if line.strip()) - (task != "cola")  # noqa: E731
    return count("train.tsv"), count("dev.tsv")


def main(argv=None) -> int:
    from bitfit.compare import METHOD_ORDER, PRESET_GRIDS, PRESET_SEEDS, PRESETS, TASKS
    from bitfit.methods import get_method
    from bitfit_cli.compare import GLUE_DEFAULT

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="full", choices=("medium", "full"))
    ap.add_argument("--costs", default=str(REPO / "bench/results/compare_costs.json"))
    ap.add_argument("--glue", default=str(GLUE_DEFAULT))
    args = ap.parse_args(argv)
    s = PRESETS[args.preset]
    grids, seeds = PRESET_GRIDS.get(args.preset, {}), PRESET_SEEDS.get(args.preset, {})
    costs = json.loads(Path(args.costs).read_text())
    step = {(e["method"], e["task"]): e.get("step_cpu_seconds") or e["step_seconds"] for e in costs["runs"].values()}
    costs_batch = costs["settings"]["batch_size"]
    methods = [m for m in METHOD_ORDER if any(k[0] == m for k in step)]
    rows, total = [], 0.0
    per_method = {m: 0.0 for m in methods}
    per_task = {t: 0.0 for t in TASKS}
    for t in TASKS:
        n_train, n_dev = sizes(Path(args.glue), t)
        per_example_fwd = step[("full", t)] / costs_batch * EVAL_SHARE
        n_final = min(n_train, s.max_train or n_train)
        final_steps = math.ceil(n_final / s.batch_size) * s.epochs
        dev = min(n_dev, s.max_dev or n_dev)
        for m in methods:
            per_step = step[(m, t)] * s.batch_size / costs_batch  # per-example cost is near-linear in the batch
            grid = grids.get(m) or get_method(m).grid
            k = seeds.get(t, 1)
            final = k * (final_steps * per_step + s.epochs * dev * per_example_fwd + STARTUP_S)
            if s.select_share and len(grid) > 1:
                held = min(round(n_train * s.select_share), s.select_dev or n_train)
                sel_n = min(n_train - round(n_train * s.select_share), s.select_train or n_train)
                select = len(grid) * (math.ceil(sel_n / s.batch_size) * s.select_epochs * per_step
                                      + s.select_epochs * held * per_example_fwd + STARTUP_S)
                finals_runs = k
            else:  # on dev: every candidate is a final run
                select, finals_runs = 0.0, k * len(grid)
                final *= len(grid)
            hours = (select + final) / 3600
            rows.append((m, t, len(grid), k, finals_runs, select / 3600, final / 3600, hours))
            total += hours
            per_method[m] += hours
            per_task[t] += hours
    print(f"$ {' '.join(['python', *sys.argv])}")
    print(f"preset {args.preset}: {s}; step CPU seconds from {os.path.relpath(args.costs, REPO)}\n")
    print("| method | task | lr candidates | seeds | final runs | selection CPU h | final CPU h | CPU h |")
    print("|---|---|---|---|---|---|---|---|")
    for m, t, g, k, fr, sel, fin, h in rows:
        print(f"| {m} | {TASKS[t]} | {g} | {k} | {fr} | {sel:.2f} | {fin:.2f} | {h:.2f} |")
    print("\n| method | CPU h |\n|---|---|\n" + "\n".join(f"| {m} | {h:.2f} |" for m, h in per_method.items()))
    print("\n| task | CPU h |\n|---|---|\n" + "\n".join(f"| {TASKS[t]} | {h:.2f} |" for t, h in per_task.items()))
    print(f"\ntotal: {total:.1f} CPU hours (one core); with --jobs 2 on two free cores about {total / 2:.1f} wall hours")
    return 0


if __name__ == "__main__":
    sys.exit(main())
