"""The method comparison on GLUE as a benchmark script: `bitfit compare` with this repo's paths.

    .venv/bin/python bench/compare.py --quick                   # small fixed subsets, default lrs, ~20 min on 1 core
    .venv/bin/python bench/compare.py --preset medium --jobs 2  # 1,000 examples a task, a small lr grid (~2.5 h, 2 cores)
    .venv/bin/python bench/compare.py                           # full train splits, each method's lr grid (days; resumable)

Results go to bench/results/compare_{quick,medium,full}.{json,md,png,log}; rerunning resumes the JSON file.
Every other option of `bitfit compare --help` passes through.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    os.chdir(REPO)  # results paths are relative to the repository root
    from bitfit_cli.main import main

    sys.exit(main(["compare", *sys.argv[1:]]))
