"""In-process parts of the serving benchmark: traffic, interleaved timing, and every variant run on one CPU.

Each variant is a function that serves a fixed workload and returns how many sequences it answered. The
variants compared with each other run in the same rounds, in a rotating order (A B C, B C A, ...), and
every figure is the median over rounds of a per-round ratio, so a burst of load from another job on the
shared machine moves both sides of a ratio instead of one.
"""

from __future__ import annotations

import copy
import random
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from bitfit.heads import pool
from server.runtime.engine import TorchEngine as Engine
from server.runtime.engine import choose_mode
from server.testing import random_bias_set

GLUE_SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue" / "SST-2" / "dev.tsv"
SWAP_ONLY = 1 << 30  # group_max_tasks for the swap-only policy: every mixed batch runs one swap forward per task
PEFT_TARGETS = ("query", "value")


# -- traffic -------------------------------------------------------------------------------------------------

def load_texts(n: int, path: Path = GLUE_SST2) -> tuple[list[str], str]:
    """`n` request texts in arrival order: SST-2 dev sentences where present (real lengths), else synthetic."""
    if path.is_file():
        lines = path.read_text(encoding="utf-8").splitlines()[1:]
        sentences = [line.split("\t")[0].strip() for line in lines if line.strip()]
        return [sentences[i % len(sentences)] for i in range(n)], f"SST-2 dev sentences ({path})"
    rng = random.Random(0)
    words = "the a film movie plot actor story quietly brilliant dull gripping long short fine bad good".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(4, 30))) for _ in range(n)], "synthetic sentences"


def assign_tasks(n_requests: int, n_tasks: int, seed: int = 0) -> list[int]:
    """Task of each request: uniform over `n_tasks`, independent per request (no sticky sessions)."""
    rng = random.Random(seed * 1_000_003 + n_tasks)
    return [rng.randrange(n_tasks) for _ in range(n_requests)]


def batches(texts: Sequence[str], tasks: Sequence[int], batch: int) -> list[tuple[list[str], list[int]]]:
    """Requests cut into batches in arrival order, as a runner that always finds a full batch would."""
    return [(list(texts[s : s + batch]), list(tasks[s : s + batch])) for s in range(0, len(texts), batch)]


# -- timing --------------------------------------------------------------------------------------------------

def interleave(variants: dict[str, Callable[[], int]], rounds: int, warmup: bool = True) -> dict[str, list[float]]:
    """Sequences per second of each variant in each round; the order rotates every round."""
    names = list(variants)
    if warmup:
        for name in names:
            variants[name]()
    out: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            n = variants[name]()
            out[name].append(n / (time.perf_counter() - start))
    return out


def median_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median over rounds of num[r] / den[r]."""
    return statistics.median(a / b for a, b in zip(num, den))


def summary(samples: dict[str, list[float]]) -> dict[str, dict]:
    return {k: {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)} for k, v in samples.items()}


# -- our engine ----------------------------------------------------------------------------------------------

def make_engine(backbone, sets: Sequence, max_batch: int) -> Engine:
    """An engine on a private copy of the backbone, task k resident under the key k."""
    backbone.reset_biases()
    engine = Engine(copy.deepcopy(backbone), capacity=max(8, len(sets)))
    for k, s in enumerate(sets):
        engine.bank.load(k, s)
    return engine


def random_sets(backbone, n: int) -> list:
    return [random_bias_set(backbone, f"t{k}", seed=k, scale=0.05) for k in range(n)]


def engine_policy(engine: Engine, work, group_max_tasks: int, modes: dict | None = None) -> Callable[[], int]:
    """Serve `work` (batches of (texts, tasks)) the way the runner does: encode, choose the mode, run."""
    rows = [torch.tensor([engine.bank.row(t) for t in tasks], dtype=torch.long) for _, tasks in work]

    def run() -> int:
        n = 0
        for (texts, _), r in zip(work, rows):
            encoded, _ = engine.encode(texts)
            mode = choose_mode(len(torch.unique(r)), group_max_tasks)
            out = engine.run(encoded, r, mode)
            if modes is not None:
                modes[out.mode] = modes.get(out.mode, 0) + 1
            n += len(texts)
        return n

    return run


def swap_cost(engine: Engine, encoded_by_batch: dict[int, dict], rounds: int, swaps_per_block: int,
              n_tasks: int, seed: int = 0) -> dict:
    """Seconds of one in-place swap of a whole bias set against one batch forward, per batch size.

    The swap is the copy `Engine` does when a batch's task is not the one in the flat buffer: the task's
    bank row into the buffer the bias parameters view. Rows are drawn at random from a bank of
    `n_tasks`, so most come from outside the CPU caches, as they would with many tasks.
    """
    rng = random.Random(seed)
    bank_rows = [engine.bank.row(k) for k in range(n_tasks)]
    swap_s, fwd_s = [], {b: [] for b in encoded_by_batch}
    same = {b: torch.full((e["input_ids"].shape[0],), bank_rows[0], dtype=torch.long)
            for b, e in encoded_by_batch.items()}
    with torch.inference_mode():
        for _ in range(rounds):
            picks = [rng.choice(bank_rows) for _ in range(swaps_per_block)]
            start = time.perf_counter()
            for r in picks:
                engine.flat.copy_(engine.bank.rows[r])
            swap_s.append((time.perf_counter() - start) / swaps_per_block)
            engine.reset()  # the copies above went behind the engine's back: make it forget what is in place
            for b, enc in encoded_by_batch.items():
                engine.run(enc, same[b], "swap")  # puts row 0 in place: the timed forward swaps nothing
                start = time.perf_counter()
                engine.run(enc, same[b], "swap")
                fwd_s[b].append(time.perf_counter() - start)
    out = {"swap_us": statistics.median(swap_s) * 1e6, "bytes": engine.bank.rows[0].nbytes, "batches": {}}
    for b, times in fwd_s.items():
        out["batches"][b] = {"forward_ms": statistics.median(times) * 1e3,
                             "ratio": median_ratio(swap_s, times), "tokens": int(encoded_by_batch[b]["input_ids"].shape[1])}
    return out


# -- peers ---------------------------------------------------------------------------------------------------

class Heads:
    """One random classification head per task (2 labels, mean pooling), as each peer needs one too."""

    def __init__(self, n_tasks: int, hidden: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(n_tasks, 2, hidden, generator=g) * 0.5  # (T, 2, h)
        self.bias = torch.randn(n_tasks, 2, generator=g)  # (T, 2)

    def __call__(self, hidden, mask, tasks: torch.Tensor) -> torch.Tensor:
        pooled = pool(hidden, mask, "mean", None).float()  # (b, h)
        return torch.bmm(self.weight[tasks], pooled.unsqueeze(-1)).squeeze(-1) + self.bias[tasks]  # (b, 2)


def peft_multi_lora(backbone, n_adapters: int, rank: int = 8, seed: int = 0):
    """PEFT LoRA on a private copy of the backbone: one adapter per task, rank `rank` on query and value.

    `init_lora_weights=False` makes B non-zero, so every adapter changes the outputs, as trained ones do.
    """
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    backbone.reset_biases()
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(PEFT_TARGETS), lora_dropout=0.0,
                        init_lora_weights=False)
    model = get_peft_model(copy.deepcopy(backbone.model), config, adapter_name="t0")
    for k in range(1, n_adapters):
        model.add_adapter(f"t{k}", config)
    return model.eval()


def peft_policy(model, engine: Engine, heads: Heads, work) -> Callable[[], int]:
    """Mixed batches through PEFT's `adapter_names`: one forward, each row through its own adapter."""
    names = [[f"t{t}" for t in tasks] for _, tasks in work]
    idx = [torch.tensor(tasks, dtype=torch.long) for _, tasks in work]

    def run() -> int:
        n = 0
        with torch.inference_mode():
            for (texts, _), an, t in zip(work, names, idx):
                encoded, _ = engine.encode(texts)  # the same tokenizer and padding as ours
                out = model(**encoded, adapter_names=an)
                heads(out.last_hidden_state, encoded["attention_mask"], t)
                n += len(texts)
        return n

    return run


def model_copies(backbone, sets: Sequence) -> list:
    """One full copy of the backbone per task, with that task's biases written in."""
    copies = []
    for s in sets:
        backbone.layout.scatter(backbone.model, s.absolute_biases(backbone.original))
        copies.append(copy.deepcopy(backbone.model).eval())
    backbone.reset_biases()
    return copies


def copies_policy(models: Sequence, engine: Engine, heads: Heads, work) -> Callable[[], int]:
    """Each task's rows through that task's own model copy (one forward per task present in the batch)."""

    def run() -> int:
        n = 0
        with torch.inference_mode():
            for texts, tasks in work:
                encoded, _ = engine.encode(texts)
                t = torch.tensor(tasks, dtype=torch.long)
                for task in sorted(set(tasks)):
                    sel = (t == task).nonzero().squeeze(1)
                    part = {k: v.index_select(0, sel) for k, v in encoded.items()}
                    out = models[task](**part)
                    heads(out.last_hidden_state, part["attention_mask"], t.index_select(0, sel))
                n += len(texts)
        return n

    return run


def save_finetuned(backbone, bias_set, directory: Path) -> Path:
    """What a naive deployment keeps per task: a whole fine-tuned model directory."""
    backbone.layout.scatter(backbone.model, bias_set.absolute_biases(backbone.original))
    try:
        backbone.model.save_pretrained(directory)
    finally:
        backbone.reset_biases()
    return directory


def reload_policy(directory: Path, engine: Engine, heads: Heads, work) -> Callable[[], int]:
    """Load the task's fine-tuned model from disk for every request batch (one task per batch), then run it."""
    from transformers import AutoModel

    def run() -> int:
        n = 0
        with torch.inference_mode():
            for texts, tasks in work:
                model = AutoModel.from_pretrained(directory, dtype=torch.float32).eval()
                encoded, _ = engine.encode(texts)
                out = model(**encoded)
                heads(out.last_hidden_state, encoded["attention_mask"], torch.tensor(tasks, dtype=torch.long))
                n += len(texts)
        return n

    return run
