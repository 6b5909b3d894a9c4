"""GPU check for the serving engine: equivalence on the device, then a swap-vs-gather timing table.

    python bench/gpu_check.py                       # cuda, float32 and bfloat16 (about a minute)
    python bench/gpu_check.py --device cpu --dtypes float32 --iters 3    # CPU smoke test
    python bench/gpu_check.py --compile             # also the engine under torch.compile

1) For each dtype: four random tasks (two single-text tasks sharing a head, a 3-label pair task read
   through BERT's pooler, a regression task) on the real MiniLM. Each input alone through the plain model
   with the task's biases written in is the reference; a gather batch, a group batch and one swap batch
   per task must match it within the dtype's tolerance (final logits). Exits 1 on any mismatch.
2) Milliseconds per batch for the plain model (biases in place), swap, gather (through the banked-bias layers) and
   group, at a few batch sizes, and each mode's speed relative to the plain forward (1.00 = as fast); with
   --compile, the plain model and the gather engine under torch.compile too.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bitfit.evaluate import task_model_from_bias_set  # noqa: E402
from bitfit.heads import pool  # noqa: E402
from server.runtime.engine import DTYPES, TorchEngine as Engine  # noqa: E402
from server.testing import minilm, random_bias_set  # noqa: E402

# A batch against single-input runs: different shapes, padding and kernels, so half precision drifts through six
# layers (bfloat16 keeps 8 mantissa bits). A wrong row or a bad broadcast moves logits by O(1) with these deltas.
TOLERANCES = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=1e-1, rtol=5e-2),
              torch.float16: dict(atol=2e-2, rtol=2e-2)}
TEXTS = ["a gripping, beautifully acted film", "dull.", "I expected more from the director of such a fine debut",
         "not bad at all", "the worst two hours of my year, and the popcorn was stale too", "quietly brilliant"]
PAIRS = [("A man is playing a guitar.", "Someone plays music."), ("The cat sleeps.", "A stock market crashed."),
         ("Two dogs run in a field.", "Dogs are running outside on the grass."), ("Hi", "Hello")]


def make_tasks(backbone):
    return {
        "sent": (random_bias_set(backbone, "sent", seed=1, head_seed=7), TEXTS),
        "sent_b": (random_bias_set(backbone, "sent_b", seed=2, head_seed=7), TEXTS[::-1]),
        "nli": (random_bias_set(backbone, "nli", ["e", "n", "c"], pooling="pooler", seed=3), PAIRS),
        "sts": (random_bias_set(backbone, "sts", [], pooling="cls", seed=4), PAIRS[::-1]),
    }


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def reference(backbone, bias_set, items, device, dtype):
    """Each input alone, through a plain copy of the backbone on the device with the task's biases in place."""
    plain = copy.deepcopy(backbone)
    plain.model.to(device=device, dtype=dtype)
    model = task_model_from_bias_set(plain, bias_set).to(device)  # biases cast into the model's dtype
    outs = []
    for x in items:
        enc = plain.encode([x]) if isinstance(x, str) else plain.encode([x[0]], [x[1]])
        enc = {k: v.to(device) for k, v in enc.items()}
        out = model.backbone(**enc)
        pooled = pool(out.last_hidden_state, enc["attention_mask"], bias_set.pooling, out.pooler_output)
        outs.append(model.head.out(pooled.float())[0].cpu())  # the head in float32, as the engine runs it
    return outs


def check_equivalence(backbone, device, dtype) -> list[str]:
    tasks = make_tasks(backbone)
    engine = Engine(copy.deepcopy(backbone), device=device, dtype=dtype)
    for name, (bias_set, _) in tasks.items():
        engine.bank.load(name, bias_set)
    want = {name: reference(backbone, bias_set, items, device, dtype) for name, (bias_set, items) in tasks.items()}
    tol, failures = TOLERANCES[dtype], []
    if torch.allclose(want["sent"][0], want["sent_b"][-1], atol=1e-2):
        failures.append("tasks sent and sent_b give the same answer: the check would prove nothing")
    order = [(n, i) for i in range(6) for n in tasks if i < len(tasks[n][1])]
    items = [tasks[n][1][i] for n, i in order]
    rows = torch.tensor([engine.bank.row(n) for n, _ in order])
    encoded, _ = engine.encode(items)
    for mode in ("gather", "group"):
        out = engine.run(encoded, rows, mode)
        for (name, i), got in zip(order, out.outputs):
            if not torch.allclose(got, want[name][i], **tol):
                failures.append(f"{mode} {name}[{i}]: {got.tolist()} != {want[name][i].tolist()}")
    for name, (_, task_items) in tasks.items():
        enc, _ = engine.encode(task_items)
        out = engine.run(enc, torch.full((len(task_items),), engine.bank.row(name)), "swap")
        for i, got in enumerate(out.outputs):
            if not torch.allclose(got, want[name][i], **tol):
                failures.append(f"swap {name}[{i}]: {got.tolist()} != {want[name][i].tolist()}")
    return failures


@torch.inference_mode()
def timing(backbone, device, dtype, batch_sizes, n_tasks, iters, compile_: bool = False) -> list[dict]:
    engine = Engine(copy.deepcopy(backbone), device=device, dtype=dtype)
    sets = [random_bias_set(backbone, f"t{k}", seed=k) for k in range(n_tasks)]
    for k, s in enumerate(sets):
        engine.bank.load(k, s)
    plain = copy.deepcopy(backbone)
    plain.model.to(device=device, dtype=dtype)
    if compile_:  # the same engine and model under torch.compile (compiled on the first batches, not timed)
        compiled = Engine(copy.deepcopy(backbone), device=device, dtype=dtype, compile=True)
        for k, s in enumerate(sets):
            compiled.bank.load(k, s)
        plain_compiled = torch.compile(copy.deepcopy(backbone).model.to(device=device, dtype=dtype), dynamic=True)
    # one CPU thread: count this thread's CPU time, which other jobs on a shared machine disturb far less
    clock = time.thread_time if device.type == "cpu" and torch.get_num_threads() == 1 else time.perf_counter
    rows_out = []
    for b in batch_sizes:
        texts = [TEXTS[i % len(TEXTS)] + f" ({i})" for i in range(b)]
        encoded, _ = engine.encode(texts)
        one = torch.zeros(b, dtype=torch.long)
        mixed = torch.arange(b) % n_tasks

        runs = {
            "plain": lambda: plain.model(**encoded),
            "swap": lambda: engine.run(encoded, one, "swap"),
            "gather": lambda: engine.run(encoded, mixed, "gather"),
            "group": lambda: engine.run(encoded, mixed, "group"),
        }
        if compile_:
            runs |= {"plain_compiled": lambda: plain_compiled(**encoded),
                     "gather_compiled": lambda: compiled.run(encoded, mixed, "gather")}
        ms = {}
        for name, fn in runs.items():
            for _ in range(2):
                fn()
            sync(device)
            best = float("inf")
            for _ in range(3):  # best of 3 rounds: least disturbed by other work on the machine
                start = clock()
                for _ in range(iters):
                    fn()
                sync(device)
                best = min(best, (clock() - start) / iters * 1000)
            ms[name] = best
        rows_out.append({"batch": b, "tokens": int(encoded["input_ids"].shape[1]), "tasks": n_tasks, **{
            f"{k}_ms": round(v, 3) for k, v in ms.items()}, **{
            f"{k}_speed": round(ms["plain"] / ms[k], 3) for k in ms if k != "plain"}})
    return rows_out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--batch-sizes", default="8,32,128")
    p.add_argument("--tasks", type=int, default=4, help="tasks mixed in a gather/group batch")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--threads", type=int, help="torch CPU threads (1 gives steadier CPU timings on a busy machine)")
    p.add_argument("--skip-check", action="store_true", help="timing only")
    p.add_argument("--compile", action="store_true", help="also time the engine and the plain model under torch.compile")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here; run with --device cpu for a smoke test", file=sys.stderr)
        return 2
    backbone = minilm()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {device} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}")
    results, ok = {"device": str(device), "device_name": name, "equivalence": {}, "timing": {}}, True
    for dtype_name in args.dtypes.split(","):
        dtype = DTYPES[dtype_name]
        if not args.skip_check:
            failures = check_equivalence(backbone, device, dtype)
            results["equivalence"][dtype_name] = failures
            ok &= not failures
            print(f"equivalence {dtype_name}: " + ("ok (gather == group == swap == each task alone)" if not failures
                                                   else f"{len(failures)} FAILURES"))
            for f in failures[:10]:
                print("   ", f)
        table = timing(backbone, device, dtype, [int(b) for b in args.batch_sizes.split(",")], args.tasks, args.iters,
                       args.compile)
        results["timing"][dtype_name] = table
        print(f"{'dtype':>9} {'batch':>5} {'tokens':>6} {'plain ms':>9} {'swap ms':>8} {'gather ms':>9} "
              f"{'group ms':>9} {'swap x':>7} {'gather x':>8} {'group x':>8}")
        for r in table:
            print(f"{dtype_name:>9} {r['batch']:>5} {r['tokens']:>6} {r['plain_ms']:>9.2f} {r['swap_ms']:>8.2f} "
                  f"{r['gather_ms']:>9.2f} {r['group_ms']:>9.2f} {r['swap_speed']:>7.2f} {r['gather_speed']:>8.2f} "
                  f"{r['group_speed']:>8.2f}")
            if args.compile:
                print(f"{'':>9} {'':>5} {'':>6} compiled: plain {r['plain_compiled_ms']:.2f} ms "
                      f"({r['plain_compiled_speed']:.2f}x eager plain), gather {r['gather_compiled_ms']:.2f} ms "
                      f"({r['gather_compiled_speed']:.2f}x eager plain, "
                      f"{r['plain_compiled_ms'] / r['gather_compiled_ms']:.2f}x compiled plain)")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
