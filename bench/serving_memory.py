"""Memory probe for the serving benchmark, run as a separate child process per kind so that nothing else
the benchmark holds (other models, other banks) counts in it.

    python bench/serving_memory.py --kind bank --counts 0,100,1000,10000

Prints one JSON line: the process RSS after the backbone is loaded and has run one forward (count 0), then
after each count of resident tasks, with the raw bytes one task's tensors take. Kinds:
- bank:          our engine as shipped: tasks loaded into its `BiasBank` (table grown by 1/8, each table its own memory mapping);
- bank-reserved: as shipped, loading a whole store at start: the server reserves the rows in one go;
- bank-doubling: the engine as it was before: the table doubling, tables from the heap (glibc's sliding mmap threshold),
                 monkeypatched here only, for comparison;
- peft:         PEFT LoRA adapters (rank 8 on query/value), one per task, added to one model;
- copies:       one full copy of the model per task.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def settle() -> int:
    gc.collect()
    return rss_bytes()


def doubling_grow(bank, capacity=None) -> None:
    """BiasBank._grow as it was: double the row table."""
    old = bank.rows
    bank.rows = torch.zeros(max(capacity or 0, old.shape[0] * 2), old.shape[1], device=bank.device, dtype=bank.dtype)
    bank.rows[: old.shape[0]].copy_(old)
    bank._free = list(range(bank.rows.shape[0] - 1, old.shape[0] - 1, -1)) + bank._free


def probe(kind: str, counts: list[int]) -> dict:
    from server.testing import minilm, random_bias_set

    backbone = minilm()
    encoded = backbone.encode(["a short warm-up sentence for the allocator"] * 8)
    points, raw, extra = [], 0, {}
    if kind in ("bank", "bank-reserved", "bank-doubling"):
        from server.runtime.bank import BiasBank
        from server.runtime.engine import TorchEngine as Engine

        if kind == "bank-doubling":
            BiasBank._grow = doubling_grow
        engine = Engine(backbone)
        with torch.inference_mode():
            engine.model(**encoded)
        base = settle()
        loaded = 0
        for c in counts:
            if kind == "bank-reserved":
                engine.bank.reserve(c)  # what TaskService.sync does before loading new tasks
            while loaded < c:
                engine.bank.load(loaded, random_bias_set(backbone, f"t{loaded}", seed=loaded))
                loaded += 1
            points.append({"count": c, "rss": settle(), "bank_bytes": engine.bank.nbytes,
                           "bank_rows": int(engine.bank.rows.shape[0])})
        probe_set = random_bias_set(backbone, "probe")
        raw = probe_set.delta.nbytes + sum(t.nbytes for t in probe_set.head.values())
        extra = {"row_bytes": engine.bank.rows[0].nbytes}
    elif kind == "peft":
        from peft import LoraConfig, get_peft_model

        model = backbone.model
        with torch.inference_mode():
            model(**encoded)
        base = settle()
        config = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], lora_dropout=0.0,
                            init_lora_weights=False)
        peft_model, loaded = None, 0
        for c in counts:
            while loaded < c:
                if peft_model is None:
                    peft_model = get_peft_model(model, config, adapter_name="t0")
                else:
                    peft_model.add_adapter(f"t{loaded}", config)
                loaded += 1
            if peft_model is not None:
                with torch.inference_mode():
                    peft_model(**encoded)
            points.append({"count": c, "rss": settle()})
        if peft_model is not None:
            raw = sum(p.nbytes for n, p in peft_model.named_parameters() if ".t0." in n)
    elif kind == "copies":
        model = backbone.model
        with torch.inference_mode():
            model(**encoded)
        base = settle()
        copies = []
        for c in counts:
            while len(copies) < c:
                copies.append(copy.deepcopy(model))
            points.append({"count": c, "rss": settle()})
        raw = sum(p.nbytes for p in model.parameters()) + sum(b.nbytes for b in model.buffers())
    else:
        raise SystemExit(f"unknown kind {kind!r}")
    for p in points:
        p["per_task"] = (p["rss"] - base) / p["count"] if p["count"] else None
        p["per_task_x_raw"] = p["per_task"] / raw if p["count"] and raw else None
    return {"kind": kind, "base_rss": base, "raw_bytes_per_task": raw, "points": points, **extra}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kind", required=True, choices=["bank", "bank-reserved", "bank-doubling", "peft", "copies"])
    p.add_argument("--counts", default="0,100,1000,10000")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(json.dumps(probe(args.kind, [int(c) for c in args.counts.split(",")])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
