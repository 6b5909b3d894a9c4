"""E2E NLG on SmolLM2-135M: BitFit, LoRA and full fine-tuning against the base model zero-shot, in BLEU.

Every number comes from the product's own commands, run as child processes: `bitfit train --objective lm`
(one method per run) and `bitfit eval` (greedy, or beam search), so a row is reproducible by its command.
The parent records each child's wall time and peak RSS (from wait4, the child's own high-water mark) in
one results file (JSON, rewritten atomically after every run, so an interrupted comparison resumes), and
`--stage report` writes the table (BENCHMARKS.md, between the e2e markers), a PNG and prints the table.

One stage a call, so long jobs run one at a time in the background with their tqdm logs:

    B="nice -n 10 .venv/bin/python bench/e2e_compare.py"
    $B train --method bitfit        # then lora, full (same data subset, steps, batch)
    $B eval --model bitfit          # greedy on all 630 test inputs; --beams 4 [--max-test 100] for beam
    $B eval --model base            # the floor: SmolLM2 zero-shot with the same prompt
    $B report
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "e2e"
RESULTS = REPO / "bench" / "results" / "e2e"
WORK = Path(os.environ.get("BITFIT_E2E_WORK", "/tmp/bitfit-e2e"))  # checkpoints (full FT: 539 MB) stay out of the repo
SEED_SET = REPO / "server" / "seed" / "smollm2" / "e2e.safetensors"
BEGIN = "<!-- e2e:begin (written by bench/e2e_compare.py report; edit outside these markers) -->"
END = "<!-- e2e:end -->"

# Same budget for every method: steps × batch over one fixed random subset of the training lines.
BUDGET = {"steps": 100, "batch_size": 16, "max_dev": 200, "threads": 1, "seed": 0}
LR = {"bitfit": 3e-3, "lora": 2e-3, "full": 1e-4}  # one each: no grid fits 2 shared cores
# LoRA paper, Table 3: GPT-2 medium on E2E test (beam 10, length penalty 0.8, no-repeat 4-gram), theirs
PAPER = [("GPT-2 M, full fine-tuning", "354.92 M", 68.2), ("GPT-2 M, LoRA", "0.35 M", 70.4),
         ("GPT-2 M, prefix-layer", "0.35 M", 69.7)]


def model_path(method: str) -> Path:
    return WORK / f"e2e-smollm2-{method}.safetensors"


def run_child(cmd: list[str], log: Path) -> dict:
    """Run `cmd` with its output teed into `log`; wall seconds, peak RSS (bytes) and exit status."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                                env=os.environ | {"PYTHONUNBUFFERED": "1"})
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.exit(f"{' '.join(cmd)} failed with status {code}; see {log}")
    return {"wall_s": round(wall, 1), "peak_rss": usage.ru_maxrss * 1024}


def load_results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"train": {}, "eval": {}}


def save_results(path: Path, results: dict) -> None:
    from bitfit.files import write_atomic

    write_atomic(path, (json.dumps(results, indent=1, sort_keys=True) + "\n").encode())


def bitfit_cmd() -> list[str]:
    return [str(REPO / ".venv" / "bin" / "bitfit")] if (REPO / ".venv" / "bin" / "bitfit").exists() else \
        [sys.executable, "-m", "bitfit_cli.main"]


def stage_train(args) -> tuple[str, str, dict]:
    from safetensors import safe_open

    budget = BUDGET | {k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size), ("max_dev", args.max_dev)) if v}
    lr = args.lr or LR[args.method]
    out = model_path(args.method)
    cmd = bitfit_cmd() + [
        "train", "--backbone", "smollm2", "--objective", "lm", "--data", str(args.data), "--task", "e2e",
        "--out", str(out), "--method", args.method, "--lr", f"{lr:g}", "--epochs", "1",
        "--max-steps", str(budget["steps"]), "--max-train", str(budget["steps"] * budget["batch_size"]),
        "--batch-size", str(budget["batch_size"]), "--max-dev", str(budget["max_dev"]),
        "--threads", str(budget["threads"]), "--seed", str(budget["seed"]),
    ]
    row = run_child(cmd, RESULTS / "logs" / f"train-{args.method}.log")
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    metrics, train_args = json.loads(meta["metrics"]), json.loads(meta["train_args"])
    row |= {"method": args.method, "lr": lr, "command": " ".join(["bitfit"] + cmd[len(bitfit_cmd()):]),
            "trainable": metrics["trainable"], "total": metrics["total"], "dev_loss": metrics["loss"],
            "steps": train_args["steps"], "train_s": train_args.get("seconds"), "train_lines": train_args["train_examples"],
            "batch_size": budget["batch_size"], "file": str(out), "file_bytes": out.stat().st_size,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    print(json.dumps(row, indent=1))
    return "train", args.method, row


def stage_eval(args) -> tuple[str, str, dict]:
    name = args.model
    target = ["--base"] if name == "base" else ["--bias-set", str(model_path(name))]
    key = f"{name}/{'greedy' if args.beams == 1 else f'beam{args.beams}'}/{args.max_test or 'all'}"
    out = RESULTS / "outputs" / f"{key.replace('/', '-')}.json"
    cmd = bitfit_cmd() + ["eval", *target, "--backbone", "smollm2", "--data", str(args.data), "--split", "test",
                          "--beams", str(args.beams), "--length-penalty", f"{args.length_penalty:g}",
                          "--threads", str(args.threads), "--json", str(out)]
    if args.max_test:
        cmd += ["--max-test", str(args.max_test)]
    row = run_child(cmd, RESULTS / "logs" / f"eval-{key.replace('/', '-')}.log")
    scored = json.loads(out.read_text())
    row |= {k: scored[k] for k in ("bleu", "signature", "inputs", "references", "decoding", "beams", "length_penalty",
                                   "max_new_tokens", "seconds")}
    row |= {"model": name, "command": " ".join(["bitfit"] + cmd[len(bitfit_cmd()):]), "outputs_file": str(out.relative_to(REPO)),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    print(json.dumps(row, indent=1))
    return "eval", key, row


def stage_ship() -> None:
    """Copy the BitFit generation set into the server's SmolLM2 seed folder."""
    import shutil

    src = model_path("bitfit")
    SEED_SET.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, SEED_SET)
    print(f"copied {src} -> {SEED_SET.relative_to(REPO)} ({SEED_SET.stat().st_size:,} bytes)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stage", choices=["train", "eval", "ship", "report"])
    p.add_argument("--method", choices=sorted(LR), help="train: the method")
    p.add_argument("--model", help="eval: a trained method (bitfit, lora, full) or base")
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--steps", type=int, help=f"train: optimizer steps (default {BUDGET['steps']})")
    p.add_argument("--batch-size", type=int, help=f"train: lines per step (default {BUDGET['batch_size']})")
    p.add_argument("--max-dev", type=int, help=f"train: dev lines for the dev loss (default {BUDGET['max_dev']})")
    p.add_argument("--lr", type=float, help="train: peak learning rate (default: the method's in LR)")
    p.add_argument("--beams", type=int, default=1)
    p.add_argument("--length-penalty", type=float, default=1.0)
    p.add_argument("--max-test", type=int, help="eval: a fixed random subset of test inputs (default: all 630)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--results", default=str(RESULTS / "results.json"))
    args = p.parse_args(argv)
    path = Path(args.results)
    if args.stage == "ship":
        stage_ship()
        return 0
    if args.stage == "report":
        from e2e_report import report

        report(load_results(path), path)
        return 0
    if args.stage == "train" and not args.method:
        p.error("train needs --method")
    if args.stage == "eval" and not args.model:
        p.error("eval needs --model")
    section, key, row = stage_train(args) if args.stage == "train" else stage_eval(args)
    results = load_results(path)  # read again: another stage may have finished meanwhile
    results[section][key] = row
    save_results(path, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
