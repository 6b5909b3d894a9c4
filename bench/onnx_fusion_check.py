"""A one-off check: does ONNX Runtime's transformer optimiser (attention, GELU and layer-norm fusion) speed up
MiniLM here? Exports the plain model with eager attention (which the fuser recognises), fuses it with
`onnxruntime.transformers.optimizer`, and times it beside the plain export the benchmark uses (sdpa attention),
one thread, a batch of 32 SST-2 dev sentences, CPU time, median of 5 interleaved rounds.

    .venv/bin/python bench/onnx_fusion_check.py     # after bench/onnx_serving.py has built its plain export

Quoted in docs/onnx.md and BENCHMARKS.md ("ONNX Runtime").
"""

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> int:
    import onnxruntime as ort
    from onnxruntime.transformers.optimizer import optimize_model

    from bitfit.backbone import load_backbone
    from runtime import sst2_dev
    from server.runtime.inputs import Encoder
    from server.runtime.onnx_export import default_cache_dir, export_graph

    bb = load_backbone()
    plain = default_cache_dir() / f"bench-plain-{bb.layout.fingerprint[:16]}-fp32.onnx"
    if not plain.is_file():
        sys.exit(f"{plain} is missing: run bench/onnx_serving.py first")
    bb.model.set_attn_implementation("eager")
    tmp = Path(tempfile.mkdtemp(prefix="onnx-fusion-"))
    eager = tmp / "plain-eager.onnx"
    export_graph(bb, eager, plain=True)
    fused = optimize_model(str(eager), model_type="bert", num_heads=12, hidden_size=bb.hidden_size, opt_level=1)
    print("fused:", {k: v for k, v in fused.get_fused_operator_statistics().items() if v})
    fused.save_model_to_file(str(tmp / "plain-eager-fused.onnx"))
    enc = Encoder(bb.tokenizer, bb.max_length)
    batch = enc.collate(enc.encode(sst2_dev()[:32]))

    def session(path):
        o = ort.SessionOptions()
        o.intra_op_num_threads = o.inter_op_num_threads = 1
        return ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])

    sessions = {"plain (sdpa)": session(plain), "plain (eager)": session(eager),
                "plain (eager), fused": session(tmp / "plain-eager-fused.onnx")}
    feeds = {k: {i.name: batch[i.name].numpy() for i in s.get_inputs()} for k, s in sessions.items()}
    ref = sessions["plain (sdpa)"].run(None, feeds["plain (sdpa)"])[0]
    times = {k: [] for k in sessions}
    for _ in range(5):
        for k, s in sessions.items():
            start = time.process_time()
            out = s.run(None, feeds[k])[0]
            times[k].append(time.process_time() - start)
            assert np.abs(out - ref).max() < 1e-4, k
    print(".venv/bin/python bench/onnx_fusion_check.py")
    for k, v in times.items():
        print(f"{k}: {np.median(v) * 1e3:.0f} ms a batch of 32")
    return 0


if __name__ == "__main__":
    sys.exit(main())
