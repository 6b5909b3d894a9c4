"""Dev accuracy of the shipped tasks through each backend: torch fp32 (the reference), ONNX Runtime fp32, ONNX
Runtime int8 (dynamic int8 weights), on the whole GLUE dev splits.

    .venv/bin/python bench/onnx_accuracy.py              # all dev examples (SST-2 872, MRPC 408, STS-B 1,500)
    .venv/bin/python bench/onnx_accuracy.py --max-dev 64 # plumbing check

Each task runs through the engines themselves (`engine.run` on one-task batches of 32, sorted by length, exactly
as the server runs them), with the shipped bias sets of server/seed/. Prints the table (SST-2 accuracy, MRPC F1,
STS-B Pearson, and the largest logit difference from torch fp32), writes bench/results/onnx_accuracy.json and .png
and, for a whole-dev run, the block between the onnx-accuracy markers in BENCHMARKS.md.
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
GLUE = Path(os.environ.get("BITFIT_GLUE_DIR", REPO.parent / "shared" / "data" / "glue"))
BEGIN = "<!-- onnx-accuracy:begin (written by bench/onnx_accuracy.py from one run; edit outside these markers) -->"
END = "<!-- onnx-accuracy:end -->"
TASKS = {"sst2": ("SST-2", "accuracy"), "mrpc": ("MRPC", "f1"), "stsb": ("STS-B", "pearson")}
BACKENDS = ("torch fp32", "onnxruntime fp32", "onnxruntime int8")


def engines(cache: Path | None, threads: int):
    import copy

    from server.runtime.engine import TorchEngine
    from server.runtime.onnx_engine import OrtEngine
    from server.testing import minilm

    backbone = minilm()
    return {"torch fp32": TorchEngine(copy.deepcopy(backbone)),
            "onnxruntime fp32": OrtEngine(backbone, cache_dir=cache, threads=threads),
            "onnxruntime int8": OrtEngine(backbone, quantize="int8", cache_dir=cache, threads=threads)}


def run_task(engine, task: str, examples, batch: int = 32):
    """Outputs (n, k) in the order of `examples`, through one-task batches sorted by length."""
    import torch

    from bitfit.evaluate import batches_by_length

    row, outputs = engine.bank.row(task), [None] * len(examples)
    for idx in batches_by_length(examples, batch):
        items = [examples[i].text if examples[i].pair is None else (examples[i].text, examples[i].pair) for i in idx]
        out = engine.run(engine.encode(items)[0], [row] * len(idx))
        for i, o in zip(idx, out.outputs):
            outputs[i] = o
    return torch.stack(outputs)


def measure(max_dev: int | None, cache: Path | None, threads: int) -> dict:
    import torch
    from tqdm import tqdm

    from bitfit.bias_set import load_bias_set
    from bitfit.data import load_task
    from bitfit.metrics import glue_metrics

    torch.set_num_threads(threads)
    engs = engines(cache, threads)
    out = {}
    for task, (folder, metric) in tqdm(TASKS.items(), desc="tasks"):
        path = GLUE / folder
        if not path.is_dir():
            sys.exit(f"GLUE {folder} not found at {path} (set BITFIT_GLUE_DIR)")
        data = load_task(path)
        dev = data.dev[:max_dev] if max_dev else data.dev
        bias_set = load_bias_set(REPO / "server" / "seed" / f"{task}.safetensors")
        gold = torch.tensor([e.label for e in dev], dtype=torch.float64 if data.spec.is_regression else torch.long)
        per, ref = {}, None
        for name, engine in engs.items():
            engine.bank.load(task, bias_set)
            start = time.perf_counter()
            logits = run_task(engine, task, dev)
            seconds = time.perf_counter() - start
            ref = logits if ref is None else ref
            m = glue_metrics(logits, gold, data.spec.is_regression)
            if not data.spec.is_regression:
                agree = float((logits.argmax(-1) == ref.argmax(-1)).double().mean())
            else:
                agree = None
            per[name] = {"metric": m[metric], "all": m, "max_abs_diff": float((logits - ref).abs().max()),
                         "label_agreement": agree, "seconds": seconds}
        out[task] = {"metric": metric, "examples": len(dev), "backends": per}
    return out


def markdown(r: dict, png: str) -> str:
    lines = [f"Run {r['date']} on {r['machine']}: `{r['command']}` ({r['seconds'] / 60:.1f} min).", "",
             "| task (dev examples) | metric | torch fp32 | onnxruntime fp32 | onnxruntime int8 | int8 − fp32 "
             "| int8: max logit diff | int8: same label |", "|---|---|---|---|---|---|---|---|"]
    for task, t in r["tasks"].items():
        b = t["backends"]
        f, o, q = (b[k]["metric"] for k in BACKENDS)
        agree = b["onnxruntime int8"]["label_agreement"]
        lines.append(f"| {task} ({t['examples']}) | {t['metric']} | {f:.4f} | {o:.4f} | {q:.4f} | {q - f:+.4f} "
                     f"| {b['onnxruntime int8']['max_abs_diff']:.3f} | "
                     f"{'—' if agree is None else f'{agree * 100:.1f} %'} |")
    worst32 = max(t["backends"]["onnxruntime fp32"]["max_abs_diff"] for t in r["tasks"].values())
    lines += ["", f"onnxruntime fp32 against torch fp32: largest logit difference {worst32:.1e} over all three dev "
              "sets (the metric columns are equal).", "", f"![onnx accuracy]({png})"]
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(r["tasks"])
    fig, ax = plt.subplots(figsize=(7, 3.8))
    width = 0.27
    for k, name in enumerate(BACKENDS):
        vals = [r["tasks"][t]["backends"][name]["metric"] for t in tasks]
        bars = ax.bar([i + (k - 1) * width for i in range(len(tasks))], vals, width, label=name)
        ax.bar_label(bars, [f"{v:.3f}" for v in vals], fontsize=7)
    ax.set_xticks(range(len(tasks)), [f"{t}\n{r['tasks'][t]['metric']}" for t in tasks])
    lo = min(r["tasks"][t]["backends"][n]["metric"] for t in tasks for n in BACKENDS)
    ax.set_ylim(max(0.0, lo - 0.08), 1.0)
    ax.set_title(f"bench/onnx_accuracy.py — shipped tasks, GLUE dev — {r['date']}", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-dev", type=int, help="first N dev examples per task (default: all)")
    p.add_argument("--cache", type=Path, help="ONNX graph cache (default: the server's, ~/.cache/bitfit-serve/onnx)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    start = time.perf_counter()
    tasks = measure(args.max_dev, args.cache, args.threads)
    command = ".venv/bin/python bench/onnx_accuracy.py" + (f" --max-dev {args.max_dev}" if args.max_dev else "")
    r = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
         "machine": f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} thread(s)", "command": command,
         "seconds": time.perf_counter() - start, "tasks": tasks}
    name = "onnx_accuracy" + ("_quick" if args.max_dev else "")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(r, indent=2))
    plot(r, RESULTS / f"{name}.png")
    block = markdown(r, f"bench/results/{name}.png")
    print(block)
    if not args.max_dev:
        from serving_report import write_block

        write_block(REPO / "BENCHMARKS.md", block, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
