"""SST-2 on SmolLM2-135M (bias-less Llama): BitFit with injected biases against the head alone.

Both use bitfit.train.train (the loop behind `bitfit train`) on the same fixed subsets, and each writes
its bias set, so the results can be served. Prints one table row per run and appends it as JSON to
OUT/results.jsonl. Sized for 2 shared CPU cores; the numbers are in COMPARISON.md and the README.

    PYTHONUNBUFFERED=1 .venv/bin/python bench/llm_sst2.py     # rows -> bench/results/llm_sst2/results.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from bitfit.backbone import load_backbone
from bitfit.bias_set import save_bias_set
from bitfit.data import load_task
from bitfit.train import TrainConfig, to_bias_set, train

GLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"


def run(method: str, args, data) -> dict:
    start = time.perf_counter()
    inject = args.inject.split(",") if args.inject else None
    backbone = load_backbone(args.backbone, inject=inject, max_length=args.max_length)
    load_s = time.perf_counter() - start
    lr = args.lr_bitfit if method == "bitfit" else args.lr_head
    head_lr = args.head_lr if method == "bitfit" else None  # head-only: its one lr is the head's
    config = TrainConfig(method=method, epochs=args.epochs, lr=lr, head_lr=head_lr, batch_size=args.batch_size, seed=args.seed,
                         max_train=args.max_train, max_dev=args.max_dev, threads=args.threads)
    result = train(backbone, data, config)
    out = Path(args.out) / f"sst2-smollm2-{method}.safetensors"
    save_bias_set(to_bias_set(backbone, data, result, config), out)
    row = {
        "method": method, "inject": args.inject or "all", "lr": lr, "head_lr": head_lr or lr, "epochs": args.epochs,
        "train": args.max_train, "dev": args.max_dev, "max_length": backbone.max_length,
        "accuracy": round(result.metrics["accuracy"], 4), "best_epoch": result.best_epoch,
        "history": [round(h["accuracy"], 4) for h in result.history],
        "trainable": result.trainable, "total": result.total,
        "share_pct": round(100 * result.trainable / result.total, 4),
        "bias_slots": len(backbone.layout.slots), "bias_scalars": backbone.layout.size,
        "train_s": round(result.seconds, 1), "step_s": round(result.step_seconds / max(result.steps, 1), 2),
        "load_s": round(load_s, 1), "bias_set": str(out),
        "command": " ".join(["bench/llm_sst2.py", *sys.argv[1:]]),
    }
    with open(Path(args.out) / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="smollm2")
    p.add_argument("--data", default=str(GLUE / "SST-2"))
    p.add_argument("--methods", default="head,bitfit")
    p.add_argument("--inject", help="comma-separated projections (default: all seven)")
    p.add_argument("--max-train", type=int, default=768)
    p.add_argument("--max-dev", type=int, default=400)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr-bitfit", type=float, default=2e-3)
    p.add_argument("--lr-head", type=float, default=1e-2, help="the head-only method's learning rate")
    p.add_argument("--head-lr", type=float, help="BitFit's head learning rate (default: --lr-bitfit)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "llm_sst2"),
                   help="folder for results.jsonl (appended) and the bias sets (git-ignored)")
    args = p.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    data = load_task(args.data, task="sst2")
    rows = [run(m, args, data) for m in args.methods.split(",")]
    print(f"\n{'method':8} {'inject':10} {'trainable':>10} {'share %':>8} {'dev acc':>8} {'train s':>8} {'s/step':>7}")
    for r in rows:
        print(f"{r['method']:8} {r['inject']:10} {r['trainable']:>10,} {r['share_pct']:>8.4f} {r['accuracy']:>8.4f} "
              f"{r['train_s']:>8.0f} {r['step_s']:>7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
