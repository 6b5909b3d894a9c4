"""Trainable share of BitFit on a bias-less decoder for each choice of injected projections (`--inject`).

Loads the backbone once per choice (cheap after the GGUF conversion is cached) and counts what
`apply_bitfit` makes trainable with a 2-class head. Prints a table.

    .venv/bin/python bench/llm_inject_share.py [--backbone smollm2]
"""

from __future__ import annotations

import argparse
import sys

from bitfit.backbone import load_backbone
from bitfit.heads import TaskHead
from bitfit.inject import apply_bitfit, count_trainable

CHOICES = {
    "all (default)": None,
    "attention q,k,v,o": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mlp gate,up,down": ["gate_proj", "up_proj", "down_proj"],
    "q,v": ["q_proj", "v_proj"],
    "q,down (BitFit's b_q, b_m2)": ["q_proj", "down_proj"],
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="smollm2")
    args = p.parse_args(argv)
    print(f"{'--inject':30} {'slots':>6} {'bias scalars':>13} {'trainable':>10} {'total':>13} {'share %':>8}")
    for name, inject in CHOICES.items():
        backbone = load_backbone(args.backbone, inject=inject)
        head = TaskHead(backbone.hidden_size, 2, backbone.pooling)
        apply_bitfit(backbone.model, head, inject=False, verbose=False)  # load_backbone injected the choice
        n_train, n_total, pct = count_trainable(backbone.model, head)
        print(f"{name:30} {len(backbone.layout.slots):>6} {backbone.layout.size:>13,} {n_train:>10,} {n_total:>13,} "
              f"{pct:>8.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
