"""What ONNX Runtime can do for MiniLM on this CPU at best: the forward alone, no server, no bias input.

Every ONNX variant a CPU user would try is timed beside torch eager (the bare Hugging Face model, sdpa attention):
the plain export, the export with eager attention run through ONNX Runtime's transformer optimiser (Attention,
BiasGelu, SkipLayerNormalization fused), and both of those with dynamic int8 weights (the plain one as the server
ships it: signed, per channel; the fused one with QAttention). One thread, CPU time of the process (so a busy
other core does not count), median of 7 interleaved rounds in rotating order, for three batch shapes. The
server's bias-input graph costs the same as the plain export (bench/onnx_serving.py), so these ratios bound what
the `onnxruntime` backend can reach against torch over HTTP, where tokenising, batching and heads add the same
time to both.

    .venv/bin/python bench/onnx_ceiling.py      # ~3 min: 4 exports and quantisations, then the rounds

Writes bench/results/onnx_ceiling.json and .png and its block in BENCHMARKS.md ("ONNX Runtime: the ceiling").
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from onnx_serving import GOALS  # noqa: E402  (the HTTP goals, against which the forward alone is a ceiling)
from runtime import pin, publish, ratio_rounds, sst2_dev  # noqa: E402

BEGIN = "<!-- onnx-ceiling:begin (written by bench/onnx_ceiling.py from one run; edit outside these markers) -->"
END = "<!-- onnx-ceiling:end -->"
ROUNDS = 7
VARIANTS = ["torch eager", "ort fp32", "ort fp32 fused", "ort int8", "ort int8 fused"]


def build_graphs(backbone, tmp: Path) -> dict[str, Path]:
    """The four ONNX files: plain and fused, each fp32 and int8."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    from server.runtime.onnx_export import export_graph, quantize_graph

    paths = {"ort fp32": tmp / "plain.onnx", "ort fp32 fused": tmp / "fused.onnx",
             "ort int8": tmp / "plain-int8.onnx", "ort int8 fused": tmp / "fused-int8.onnx"}
    export_graph(backbone, paths["ort fp32"], plain=True)
    quantize_graph(paths["ort fp32"], paths["ort int8"])
    # The fuser recognises the eager attention pattern only; sdpa exports as one opaque subgraph it leaves alone.
    backbone.model.set_attn_implementation("eager")
    try:
        export_graph(backbone, tmp / "eager.onnx", plain=True)
    finally:
        backbone.model.set_attn_implementation("sdpa")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = optimize_model(str(tmp / "eager.onnx"), model_type="bert", num_heads=backbone.model.config.num_attention_heads,
                               hidden_size=backbone.hidden_size, opt_level=1)
        fused.save_model_to_file(str(paths["ort fp32 fused"]))
        # The fused graph holds contrib ops shape inference cannot type; their outputs are fp32.
        quantize_dynamic(str(paths["ort fp32 fused"]), str(paths["ort int8 fused"]), weight_type=QuantType.QInt8,
                         per_channel=True, extra_options={"DefaultTensorType": 1})
    print("fused operators:", {k: v for k, v in fused.get_fused_operator_statistics().items() if v})
    return paths


def batches(backbone) -> dict[str, dict]:
    import torch

    from server.runtime.inputs import Encoder

    enc = Encoder(backbone.tokenizer, backbone.max_length)
    texts = sst2_dev()
    b32 = enc.collate(enc.encode(texts[:32]))
    pad = 128 - b32["input_ids"].shape[1]  # the same sentences padded as a fixed-length export would feed them
    long = {k: torch.nn.functional.pad(v, (0, pad), value=enc.pad_id if k == "input_ids" else 0) for k, v in b32.items()}
    return {"32 x longest": b32, "8 x longest": enc.collate(enc.encode(texts[32:40])), "32 x 128 padded": long}


def measure(backbone, paths: dict[str, Path], batch: dict) -> dict:
    import numpy as np
    import torch

    from server.runtime.onnx_engine import make_session

    model = backbone.model.eval()
    with torch.inference_mode():
        ref = model(**batch).last_hidden_state.numpy()
    mask = batch["attention_mask"].numpy().astype(bool)
    fns, diffs = {}, {}
    with torch.inference_mode():
        fns["torch eager"] = lambda: model(**batch)
    for name, path in paths.items():
        s = make_session(path, 1)  # the server's own session settings, one thread
        feed = {i.name: batch[i.name].numpy() for i in s.get_inputs()}
        out = s.run(None, feed)[0]
        diffs[name] = float(np.abs(out - ref)[mask].max())  # real tokens only: padded rows are never pooled
        fns[name] = lambda s=s, feed=feed: s.run(None, feed)

    def timed(fn):
        with torch.inference_mode():
            fn()

    r = ratio_rounds({k: (lambda fn=fns[k]: timed(fn)) for k in VARIANTS}, ROUNDS, "torch eager", clock=time.process_time)
    rows = batch["input_ids"].shape[0]
    return {"shape": list(batch["input_ids"].shape), "real_tokens": int(mask.sum()),
            "seq_per_s": {k: rows / v for k, v in r["seconds"].items()}, "ratio_to_torch": r["ratio_to_torch eager"],
            "max_abs_diff_to_torch": diffs}


def markdown(r: dict, png: str) -> str:
    lines = [f"Run {r['date']} on {r['machine']}: `{r['command']}` ({r['seconds'] / 60:.1f} min). The forward alone, "
             f"one thread, CPU time, median of {ROUNDS} interleaved rounds; sequences per second and the ratio to "
             "torch eager.", "",
             "| batch | " + " | ".join(VARIANTS) + " |", "|---|" + "---|" * len(VARIANTS)]
    for shape, m in r["shapes"].items():
        cells = [f"{m['seq_per_s']['torch eager']:.1f}"] + [
            f"{m['seq_per_s'][k]:.1f} ({m['ratio_to_torch'][k]:.2f}×)" for k in VARIANTS[1:]]
        lines.append(f"| {shape} | " + " | ".join(cells) + " |")
    best32 = max(r["shapes"]["32 x longest"]["ratio_to_torch"][k] for k in ("ort fp32", "ort fp32 fused"))
    best8 = max(r["shapes"]["32 x longest"]["ratio_to_torch"][k] for k in ("ort int8", "ort int8 fused"))
    lines += ["", f"Best ONNX Runtime forward against torch, batch of 32 SST-2 sentences: fp32 {best32:.2f}× "
              f"(the HTTP goal is ≥ {GOALS['http fp32 / torch']}), int8 {best8:.2f}× (goal ≥ {GOALS['http int8 / torch']}). Largest difference to "
              "torch's hidden states on real tokens: " + ", ".join(
                  f"{k} {v:.1e}" for k, v in r["shapes"]["32 x longest"]["max_abs_diff_to_torch"].items()) + ".",
              "", f"![onnx ceiling]({png})"]
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(r["shapes"])
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(VARIANTS)
    for i, k in enumerate(VARIANTS):
        ax.bar([j + i * width for j in range(len(shapes))], [r["shapes"][s]["seq_per_s"][k] for s in shapes], width, label=k)
    ax.set_xticks([j + width * (len(VARIANTS) - 1) / 2 for j in range(len(shapes))], shapes)
    ax.set_ylabel("sequences / s (one thread)")
    ax.set_title("MiniLM forward: torch eager against ONNX Runtime variants")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    import torch

    from bitfit.backbone import load_backbone

    start = time.perf_counter()
    pin(int(os.environ.get("BENCH_CORE", "1")))
    torch.set_num_threads(1)
    backbone = load_backbone()
    with tempfile.TemporaryDirectory(prefix="onnx-ceiling-") as tmp:
        paths = build_graphs(backbone, Path(tmp))
        shapes = {name: measure(backbone, paths, b) for name, b in batches(backbone).items()}
    import onnxruntime as ort

    r = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": ".venv/bin/python bench/onnx_ceiling.py",
         "machine": f"{platform.machine()} ({platform.processor() or 'cpu'}), {os.cpu_count()} cores, torch "
                    f"{torch.__version__}, onnxruntime {ort.__version__}",
         "shapes": shapes, "seconds": time.perf_counter() - start}
    publish("onnx_ceiling", r, False, plot, markdown, BEGIN, END, start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
