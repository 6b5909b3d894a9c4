"""Output tokens/s of generation with many tasks per decode step, against the ways it is done without bias sets.

    taskset -c 1 .venv/bin/python bench/generation.py                       # 8 streams, 32 new tokens each
    taskset -c 1 .venv/bin/python bench/generation.py --tokens 8 --repeats 1  # plumbing check

One process, one torch thread, on SmolLM2-135M (float32, CPU) with the shipped E2E set and 7 perturbed copies of it
(8 tasks), 8 prompts from the E2E test split, greedy, every stream exactly `--tokens` new tokens (eos ignored):

- scheduler, 8 tasks:   8 streams of 8 tasks through `server.generation.scheduler` (per-row biases, one forward
                        per decode step for all 8), as the server runs them;
- scheduler, 1 task:    the same 8 streams all of one task (the goal: 8 tasks >= 0.9x this);
- HF generate, loop:    transformers' `generate` once per task (its task swapped into the flat bias buffer, one
                        stream each): what serving 8 bias-set tasks without mixing costs;
- HF generate, 1 task:  `generate` on all 8 streams of one task in one batch (no mixing needed; the ceiling of a
                        plain batch);
- PEFT multi-LoRA:      8 rank-8 LoRA adapters (q, v) on the same model, one `generate` with mixed
                        `adapter_names`: how LoRA servers mix adapters in a batch.

The rounds run interleaved `--repeats` times; the table gives each one's best. Prints the table and the command,
writes bench/results/generation.json and the block between the generation markers in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
E2E = Path(os.environ.get("BITFIT_E2E_DIR", REPO.parent / "shared" / "data" / "e2e"))
SHIPPED = REPO / "server" / "seed" / "smollm2" / "e2e.safetensors"
BEGIN = "<!-- generation:begin (written by bench/generation.py from one run; edit outside these markers) -->"
END = "<!-- generation:end -->"
STREAMS = 8


def mrs(n: int) -> list[str]:
    """The first `n` distinct meaning representations of the E2E test split (a fixed set without the data)."""
    seen = []
    if (E2E / "test.txt").is_file():
        for line in (E2E / "test.txt").read_text(encoding="utf-8").splitlines():
            mr = line.split("||", 1)[0].strip()
            if mr and mr not in seen:
                seen.append(mr)
            if len(seen) == n:
                return seen
    base = "name : The Eagle | Type : coffee shop | food : French | area : riverside | price : {}"
    return [base.format(i) for i in range(n)]


def build(n_tasks: int):
    """The engine with `n_tasks` generation tasks resident (the shipped set, then perturbed copies)."""
    import torch

    from bitfit.backbone import load_backbone
    from bitfit.bias_set import BiasSet
    from server.runtime.engine import TorchEngine

    engine = TorchEngine(load_backbone("smollm2"), capacity=n_tasks)
    for i in range(n_tasks):
        s = BiasSet.from_bytes(SHIPPED.read_bytes())
        s.task = f"e2e-{i}"
        if i:
            g = torch.Generator().manual_seed(i)
            s.delta = s.delta + torch.randn(s.delta.shape, generator=g) * s.delta.std() * 2.0
        engine.bank.load(s.task, s)
    return engine


def prompts(engine, texts: list[str]) -> list[list[int]]:
    info = engine.bank.info[engine.bank.row("e2e-0")]
    return [engine.tokenizer(info.prompt_template.replace("{input}", t), add_special_tokens=False)["input_ids"]
            for t in texts]


def scheduler_round(engine, ids: list[list[int]], tasks: list[str], tokens: int) -> tuple[float, int]:
    from server.generation.sampling import SamplingParams
    from server.generation.scheduler import GenerationScheduler

    s = GenerationScheduler(engine, slots=len(ids))
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    counts = [0] * len(ids)
    for i, (p, task) in enumerate(zip(ids, tasks)):
        s.submit(task, p, params, lambda e, i=i: counts.__setitem__(i, counts[i] + len(e.tokens)))
    start = time.perf_counter()
    s.run_until_idle()
    return time.perf_counter() - start, sum(counts)


def causal_lm(engine):
    """transformers' causal-LM class around the engine's own (wrapped) model, its head tied to the embeddings."""
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(engine.backbone.source)
    with torch.device("meta"):
        hf = LlamaForCausalLM(config)
    hf.model = engine.model
    hf.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
    hf.lm_head.weight = engine.model.get_input_embeddings().weight
    return hf.eval()


def hf_generate(model, ids: list[list[int]], tokens: int, pad: int, **kw) -> int:
    import torch

    from bitfit.generate import left_pad

    input_ids, mask = left_pad(ids, pad)
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens,
                             do_sample=False, pad_token_id=pad, **kw)
    return int(out.shape[0] * (out.shape[1] - input_ids.shape[1]))


def hf_loop_round(engine, hf, ids, tasks, tokens) -> tuple[float, int]:
    start, made = time.perf_counter(), 0
    for p, task in zip(ids, tasks):  # one generate per task, its biases swapped into the flat buffer
        engine._swap_in(engine.bank.row(task))
        made += hf_generate(hf, [p], tokens, engine.tokenizer.pad_token_id)
    return time.perf_counter() - start, made


def hf_batch_round(engine, hf, ids, task, tokens) -> tuple[float, int]:
    engine._swap_in(engine.bank.row(task))
    start = time.perf_counter()
    made = hf_generate(hf, ids, tokens, engine.tokenizer.pad_token_id)
    return time.perf_counter() - start, made


def peft_model(source: str, n: int):
    """The plain SmolLM2 with `n` LoRA adapters (rank 8 on q and v, B nonzero so each adapter changes outputs)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(base, config, adapter_name="a0")
    for i in range(1, n):
        model.add_adapter(f"a{i}", config)
    return model.eval()


def peft_round(model, ids, tokens, pad) -> tuple[float, int]:
    names = [f"a{i}" for i in range(len(ids))]
    start = time.perf_counter()
    made = hf_generate(model, ids, tokens, pad, adapter_names=names)
    return time.perf_counter() - start, made


def measure(tokens: int, repeats: int) -> dict:
    import torch

    engine = build(STREAMS)
    ids = prompts(engine, mrs(STREAMS))
    many, one = [f"e2e-{i}" for i in range(STREAMS)], ["e2e-0"] * STREAMS
    hf = causal_lm(engine)
    peft = peft_model(engine.backbone.source, STREAMS)
    pad = engine.tokenizer.pad_token_id
    rounds = {
        "scheduler, 8 tasks": lambda: scheduler_round(engine, ids, many, tokens),
        "scheduler, 1 task": lambda: scheduler_round(engine, ids, one, tokens),
        "HF generate, loop over 8 tasks": lambda: hf_loop_round(engine, hf, ids, many, tokens),
        "HF generate, 1 task, one batch": lambda: hf_batch_round(engine, hf, ids, "e2e-0", tokens),
        "PEFT multi-LoRA, 8 adapters mixed": lambda: peft_round(peft, ids, tokens, pad),
    }
    scheduler_round(engine, ids, many, 2)  # warm up every path once
    hf_batch_round(engine, hf, ids[:2], "e2e-0", 2)
    peft_round(peft, ids, 2, pad)
    best: dict[str, dict] = {}
    rates: dict[str, list[float]] = {name: [] for name in rounds}
    for r in range(repeats):
        for name, fn in rounds.items():
            seconds, made = fn()
            rate = made / seconds
            rates[name].append(rate)
            print(f"  round {r + 1} {name}: {made} tokens in {seconds:.2f} s = {rate:.1f} tokens/s", file=sys.stderr)
            if name not in best or rate > best[name]["tokens_per_s"]:
                best[name] = {"tokens": made, "seconds": seconds, "tokens_per_s": rate}
    engine.reset()
    # the goal's ratio per round (the two ran seconds apart), then the median: robust to a noisy round
    per_round = sorted(a / b for a, b in zip(rates["scheduler, 8 tasks"], rates["scheduler, 1 task"]))
    return {"rows": best, "rounds": rates, "ratio_8_to_1_per_round": per_round,
            "ratio_8_to_1_median": per_round[len(per_round) // 2], "threads": torch.get_num_threads(),
            "prompt_tokens": [len(p) for p in ids]}


def markdown(r: dict) -> str:
    rows = r["rows"]
    ref = rows["scheduler, 8 tasks"]["tokens_per_s"]
    lines = [f"Generation, {STREAMS} concurrent streams, {r['tokens']} new tokens each, greedy, SmolLM2-135M float32 "
             f"on the CPU, {r['threads']} thread, {r['machine']}; {r['date']}; best of {r['repeats']} interleaved "
             f"rounds. Command: `{r['command']}`",
             "",
             "| way | output tokens/s | scheduler 8 tasks vs this |",
             "|---|---:|---:|"]
    for name, v in rows.items():
        lines.append(f"| {name} | {v['tokens_per_s']:.1f} | {ref / v['tokens_per_s']:.2f}x |")
    single = rows["scheduler, 1 task"]["tokens_per_s"]
    rounds = ", ".join(f"{x:.2f}" for x in r["ratio_8_to_1_per_round"])
    lines += ["", f"8 tasks / 1 task through the scheduler: **{ref / single:.2f}x** best against best, median of the "
              f"per-round ratios **{r['ratio_8_to_1_median']:.2f}x** (rounds: {rounds}) (goal >= 0.9).", "",
              "![generation](bench/results/generation.png)"]
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(r["rows"])
    fig, ax = plt.subplots(figsize=(9, 3.8))
    bars = ax.barh(names[::-1], [r["rows"][n]["tokens_per_s"] for n in names[::-1]], color="C0")
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xlabel("output tokens / s (best round)")
    ax.set_title(f"SmolLM2-135M, {STREAMS} streams x {r['tokens']} tokens, {r['threads']} CPU thread")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=32, help="new tokens per stream")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds of every way (best of)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md and results alone")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    cpus = sorted(os.sched_getaffinity(0))
    command = (f"taskset -c {','.join(map(str, cpus))} " if len(cpus) < (os.cpu_count() or 1) else "") + \
        ".venv/bin/python bench/generation.py" + \
        (f" --tokens {args.tokens}" if args.tokens != 32 else "") + \
        (f" --repeats {args.repeats}" if args.repeats != 3 else "")
    start = time.perf_counter()
    r = measure(args.tokens, args.repeats)
    r |= {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "command": command,
          "machine": f"{platform.machine()}, {os.cpu_count()} cores, pinned to {len(cpus)}",
          "tokens": args.tokens, "repeats": args.repeats, "seconds": time.perf_counter() - start}
    block = markdown(r)
    print(block)
    if not args.no_write:
        from serving_report import write_block

        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "generation.json").write_text(json.dumps(r, indent=2))
        plot(r, RESULTS / "generation.png")
        write_block(REPO / "BENCHMARKS.md", block, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
