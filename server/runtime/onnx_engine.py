"""The ONNX Runtime engine: the backbone's exported graph on one shared session, the bank and heads as in torch.

Same seam as the torch engine (`backend.py`): `spec`, `bank` (a `BiasBank` on the CPU, float32), `encoder`,
`collate`, `run(batch, rows, mode) -> BatchOutput`, `name`. The graph (`onnx_export.py`) reads every bias per row
from its `biases` input, so each batch, whatever its tasks, is one `session.run` after one gather of the batch's
bank rows into a reused buffer (`bank.rows[rows]`, (b, N)); a one-task batch takes the same path with its row
repeated (measured: the gather is well under 1 % of the forward, bench/onnx_serving.py), and an upload only writes
a bank row. Pooling and heads run in torch on the graph's outputs (`engine.run_heads`, the torch engine's own code).

One `InferenceSession` is made at start and shared by every batch (the runner's worker calls `run`); nothing is
created per request. Its intra-op threads are `threads` (ORT's default: one per core); worker threads do not spin
between batches, since the event loop tokenising the next requests shares those cores.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from bitfit.backbone import Backbone
from bitfit.spec import ServingSpec
from server.runtime.bank import BiasBank
from server.runtime.engine import BatchOutput, batch_plan, run_grouped, run_heads
from server.runtime.inputs import Encoded, Encoder, Item
from server.runtime.onnx_export import BIASES, ExportFailed, Graph, ensure_graph

QUANTIZE = {"none": "fp32", "int8": "int8"}  # setting -> graph variant


def make_session(path: Path, threads: int | None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or 0  # 0: ORT's default, one thread per core
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OrtEngine:
    name = "onnxruntime"

    def __init__(
        self,
        backbone: Backbone,
        *,
        quantize: str = "none",
        threads: int | None = None,
        cache_dir: str | Path | None = None,
        capacity: int = 8,
    ):
        """Export (or find in the cache) the backbone's graph and open one session on it.

        The backbone is only read (spec, tokenizer, export copy); the engine keeps no reference to its model.
        """
        if quantize not in QUANTIZE:
            raise ValueError(f"quantize {quantize!r} is not one of {', '.join(QUANTIZE)}")
        self.quantize, self.variant = quantize, QUANTIZE[quantize]
        self.spec = ServingSpec.of(backbone)
        self.layout = backbone.layout
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.bank = BiasBank(self.spec, backbone.original, capacity=capacity)
        self.encoder = Encoder(backbone.tokenizer, backbone.max_length)
        self.tokenizer, self.max_length = backbone.tokenizer, backbone.max_length
        self.graph: Graph = ensure_graph(backbone, self.variant, cache_dir)
        try:
            self.session = make_session(self.graph.path, threads)
        except Exception as e:  # passed the cache's hash check yet does not load: nothing to serve
            raise ExportFailed(f"ONNX Runtime cannot load {self.graph.path} ({type(e).__name__}: {e}); "
                               "delete it to rebuild, or serve with --backend torch") from e
        names = tuple(i.name for i in self.session.get_inputs())
        if names != self.graph.inputs or BIASES not in names:
            raise ExportFailed(f"{self.graph.path} takes inputs {names}, expected {self.graph.inputs}; delete it to rebuild")
        self.token_inputs = [n for n in names if n != BIASES]
        missing = [n for n in self.token_inputs if n not in self.encoder.keys]
        if missing:
            raise ExportFailed(f"{self.graph.path} needs inputs {missing} the tokenizer does not make; delete it to rebuild")
        self.outputs = list(self.graph.outputs)
        self._biases = torch.empty(0, self.spec.layout_size)  # (b, N) reused: one gather per batch, no allocation

    def encode(self, items: Sequence[Item]) -> tuple[dict[str, torch.Tensor], list[bool]]:
        return self.encoder.padded(items, self.device)

    def collate(self, encoded: Sequence[Encoded]) -> dict[str, torch.Tensor]:
        return self.encoder.collate(encoded, self.device)

    # -- running a batch -------------------------------------------------------------------------------

    @torch.inference_mode()
    def run(self, batch: dict[str, torch.Tensor], rows: Sequence[int] | torch.Tensor, mode: str | None = None) -> BatchOutput:
        """Outputs for a batch whose input i belongs to bank row `rows[i]`.

        swap and gather are one and the same graph run here (the mode is kept for the metrics and for the
        torch engine's contract: swap refuses a batch of several tasks); group runs one graph per task.
        """
        rows, unique, mode = batch_plan(self.bank, rows, mode)
        if mode == "group":
            return run_grouped(self.bank, batch, rows, unique, self._run_one)
        hidden, pooler = self.forward(batch, rows)
        logits, widths = run_heads(self.bank, hidden, batch["attention_mask"], pooler, rows)
        return BatchOutput(logits, widths, mode)

    def forward(self, batch: dict[str, torch.Tensor], rows: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The graph on the batch, each row with its bank row's biases: hidden (b, t, h), pooler (b, h) or None."""
        feeds = {name: batch[name].numpy() for name in self.token_inputs}
        feeds[BIASES] = self.gather(rows).numpy()
        out = self.session.run(self.outputs, feeds)
        hidden = torch.from_numpy(out[0])
        return hidden, torch.from_numpy(out[1]) if len(out) > 1 else None

    def gather(self, rows: list[int]) -> torch.Tensor:
        """The batch's bank rows, (b, N), in a buffer reused across batches (grown when a batch is larger)."""
        b, table = len(rows), self.bank.rows
        if self._biases.shape[0] < b:
            self._biases = torch.empty(b, table.shape[1], dtype=table.dtype)
        out = self._biases[:b]
        torch.index_select(table, 0, torch.tensor(rows, dtype=torch.long), out=out)
        return out

    def _run_one(self, part, row: int) -> tuple[torch.Tensor, list[int]]:
        rows = [row] * part["attention_mask"].shape[0]
        hidden, pooler = self.forward(part, rows)
        return run_heads(self.bank, hidden, part["attention_mask"], pooler, rows)
