"""The E2E comparison table and plot, from bench/results/e2e/results.json (written by bench/e2e_compare.py).

Markdown into BENCHMARKS.md between the e2e markers, the same table on stdout, and a PNG beside the results.
"""

from __future__ import annotations

from pathlib import Path

from e2e_compare import BEGIN, END, PAPER, REPO, RESULTS
from serving_report import write_block

ORDER = ("bitfit", "lora", "full", "base")
LABELS = {"bitfit": "BitFit (injected biases)", "lora": "LoRA r=8 on q,v", "full": "full fine-tuning",
          "base": "base model, zero-shot"}


def _mib(b) -> str:
    return f"{b / 2**20:,.0f} MiB" if b else "–"


def _evals(results: dict, model: str) -> dict[str, dict]:
    """decoding label ("greedy", "beam 4") -> the run on the most inputs."""
    out: dict[str, dict] = {}
    for row in results["eval"].values():
        if row["model"] != model:
            continue
        have = out.get(row["decoding"])
        if have is None or row["inputs"] > have["inputs"]:
            out[row["decoding"]] = row
    return out


def rows(results: dict) -> tuple[list[list[str]], list[str]]:
    decodings = sorted({r["decoding"] for r in results["eval"].values()}, key=lambda d: (d != "greedy", d))
    table = []
    for model in ORDER:
        t, evals = results["train"].get(model), _evals(results, model)
        if t is None and not evals:
            continue
        cells = [LABELS[model]]
        if t:
            cells += [f"{t['trainable']:,}", f"{100 * t['trainable'] / t['total']:.3f} %",
                      f"{t['steps']} × {t['batch_size']} ({t['train_lines']:,})", f"{t['train_s']:,.0f} s",
                      f"{t['train_s'] / t['steps']:.1f} s", _mib(t["peak_rss"]), f"{t['dev_loss']:.3f}"]
        else:
            cells += ["0", "0 %", "–", "–", "–", "–", "–"]
        for d in decodings:
            e = evals.get(d)
            cells.append(f"**{e['bleu']:.2f}**" + ("" if e["inputs"] == 630 else f" ({e['inputs']} inputs)") if e else "–")
        table.append(cells)
    header = ["model", "trainable", "share", "steps × batch (lines)", "train wall", "s/step", "peak RSS (train)",
              "dev loss"] + [f"test BLEU, {d}" for d in decodings]
    return table, header


def _md(header: list[str], table: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in table])


def markdown(results: dict, png: Path) -> str:
    table, header = rows(results)
    commands = [r["command"] for r in results["train"].values()] + [r["command"] for r in results["eval"].values()]
    signature = next((r["signature"] for r in results["eval"].values()), "")
    paper = _md(["theirs: LoRA paper Table 3, GPT-2 medium (355 M)", "trainable", "test BLEU (beam 10)"],
                [[name, n, f"{bleu:.1f}"] for name, n, bleu in PAPER])
    return "\n".join([
        "### E2E NLG on SmolLM2-135M: BitFit, LoRA, full fine-tuning and the base model (BLEU)",
        "",
        _md(header, table),
        "",
        paper,
        "",
        f"BLEU: sacrebleu `{signature}` (lowercase, 13a, every reference of an input) on the E2E test set "
        "(630 inputs, 4,693 references). The paper's rows are theirs, for comparison of scale only: GPT-2 medium, "
        "5 epochs over all 42,061 training lines, beam 10 with length penalty 0.8 and no-repeat 4-grams; ours train "
        "the same small budget for every method on 2 shared CPU cores. Peak RSS is the training process's (wait4).",
        "",
        f"![E2E BLEU]({png.relative_to(REPO)})",
        "",
        "Commands (each row's own; `bench/e2e_compare.py` ran them and recorded wall time and peak RSS):",
        "",
        "```",
        *commands,
        "```",
    ])


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in ORDER if m in results["train"] or _evals(results, m)]
    decodings = sorted({r["decoding"] for r in results["eval"].values()}, key=lambda d: (d != "greedy", d))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
    ax = axes[0]
    width = 0.8 / max(len(decodings), 1)
    for k, d in enumerate(decodings):
        xs, ys = [], []
        for i, m in enumerate(models):
            e = _evals(results, m).get(d)
            if e:
                xs.append(i + k * width), ys.append(e["bleu"])
        bars = ax.bar(xs, ys, width, label=d)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    for (name, _, bleu), style in zip(PAPER, (":", "--", "-.")):
        ax.axhline(bleu, color="grey", lw=0.9, ls=style, label=f"theirs: {name} {bleu}")
    ax.set_xticks([i + width * (len(decodings) - 1) / 2 for i in range(len(models))], [LABELS[m] for m in models],
                  fontsize=8)
    ax.set_ylabel("E2E test BLEU (sacrebleu, lowercase, 13a)")
    ax.set_ylim(0, 80)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("SmolLM2-135M on E2E (ours) beside GPT-2 M (LoRA paper)")
    ax = axes[1]
    trained = [m for m in models if m in results["train"]]
    t = [results["train"][m] for m in trained]
    xs = range(len(trained))
    bars = ax.bar([x - 0.2 for x in xs], [r["train_s"] / r["steps"] for r in t], 0.4, label="s / step", color="C2")
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_ylabel("seconds per step (batch 16)")
    ax2 = ax.twinx()
    bars = ax2.bar([x + 0.2 for x in xs], [r["peak_rss"] / 2**30 for r in t], 0.4, label="peak RSS (GiB)", color="C3")
    ax2.bar_label(bars, fmt="%.1f", fontsize=8)
    ax2.set_ylabel("peak RSS of training (GiB)")
    ax.set_xticks(list(xs), [f"{LABELS[m]}\n{r['trainable']:,} trainable" for m, r in zip(trained, t)], fontsize=8)
    ax.set_title("training cost, same budget (1 thread, shared CPU)")
    fig.legend(loc="upper right", fontsize=7, bbox_to_anchor=(0.98, 0.98))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(results: dict, results_path: Path) -> None:
    png = RESULTS / "e2e_bleu.png"
    plot(results, png)
    block = markdown(results, png)
    write_block(REPO / "BENCHMARKS.md", block, BEGIN, END)
    print(block)
    print(f"\nwrote {png.relative_to(REPO)} and the e2e block of BENCHMARKS.md (from {results_path})")
