"""The method comparison on GLUE as a benchmark script: `bitfit compare` with this repo's paths.

    .venv/bin/python bench/compare.py --quick                   # small fixed subsets, default lrs, ~20 min on 1 core
    .venv/bin/python bench/compare.py --preset costs            # step time and peak memory: 20 steps per method and task
    .venv/bin/python bench/compare.py --preset medium --jobs 2  # 1,000 examples a task, lrs chosen on dev (~2.5 h, 2 cores)
    .venv/bin/python bench/compare.py --jobs 2                  # full: whole train splits (SST-2 20,000), lrs chosen on a
                                                                # held-out 10 % of train, 2 seeds on RTE/MRPC (~16 CPU h)
    .venv/bin/python bench/compare_plan.py                      # the full preset's CPU hours, from the costs run

Results go to bench/results/compare_{quick,costs,medium,full}.{json,md,png,log}; rerunning resumes the JSON file.
Every other option of `bitfit compare --help` passes through (--report-only regenerates the tables and plot).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    os.chdir(REPO)  # results paths are relative to the repository root
    sys.path.insert(0, str(REPO))
    from bitfit_cli.main import main

    sys.exit(main(["compare", *sys.argv[1:]]))
