"""The ONNX Runtime backend's graph: the backbone exported once, every bias read per row from one graph input.

The exported model is the backbone with every bias slot's module wrapped by its banked-bias layer (`layers.py`) in
the mode where each row's biases are given whole (`BatchMapping.biases`, (batch, N) in layout order). The graph's
inputs are the token tensors plus `biases`; it holds the frozen weights and no bias at all (the slot biases are
zeroed before export), so one graph serves the pre-trained model and every task, and an upload never needs a
re-export: the engine gathers the batch's bank rows into `biases`.

Graphs are cached on disk, one file per backbone fingerprint and variant (fp32; int8 = dynamic int8 weights,
quantised from the fp32 graph), each with a sidecar `.json` written after it (its commit mark: format, fingerprint,
variant, the exporting versions, and the file's size and sha256). A missing, stale (other format or versions),
foreign (another fingerprint) or broken (size or hash differs, or it does not load) entry is rebuilt; writes go to
a temporary file renamed into place, under a file lock, so two servers starting at once export once and a crash
never leaves a file that passes the check.

The exporter is torch's TorchScript one (`dynamo=False`): on MiniLM it exports in about 12 s where the dynamo
exporter takes about 110 s, and gives the same graph speed. Tracing bakes Python branches into the graph, so
every export is checked against the eager model on a padded batch with two different bias rows before it is cached.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from server.runtime.layers import BatchMapping, wrap_slots

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the graph's contract (inputs, outputs, wrapping) changes: older cache entries are stale
OPSET = 17
VARIANTS = ("fp32", "int8")
BIASES = "biases"  # the graph input holding each row's biases, (batch, N)
EXAMPLE = ["a short text", "a somewhat longer example sentence, so that the batch has padding"]


class ExportFailed(ValueError):
    """The backbone cannot be served by the ONNX Runtime backend (it does not export, or exports wrongly)."""


@dataclass(frozen=True)
class Graph:
    """A cached, checked graph file and what it was made from."""

    path: Path
    meta: dict  # the sidecar's content
    inputs: tuple[str, ...]  # token inputs, in graph order, then BIASES
    outputs: tuple[str, ...]  # last_hidden_state[, pooler_output]
    built: bool  # exported (or quantised) by this call rather than found in the cache


def default_cache_dir() -> Path:
    from bitfit.llm import cache_root

    return cache_root() / "onnx"


def versions() -> dict:
    """The exporting and quantising versions a cache entry records (another one makes it stale)."""
    try:
        import onnx  # noqa: F401  (the exporter writes through it)
        import onnxruntime
    except ImportError as e:
        raise ExportFailed(f"backend onnxruntime needs the packages onnxruntime and onnx ({e}); "
                           "pip install 'bitfit-serve[onnx]', or serve with --backend torch") from e
    return {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__}


def entry_paths(cache_dir: Path, fingerprint: str, variant: str) -> tuple[Path, Path]:
    stem = f"{fingerprint[:16]}-{variant}"
    return cache_dir / f"{stem}.onnx", cache_dir / f"{stem}.json"


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def entry_problem(path: Path, sidecar: Path, expected: dict) -> str | None:
    """Why a cache entry cannot be used (missing, stale, foreign, broken), or None when it can."""
    if not path.is_file() or not sidecar.is_file():
        return "not cached yet"
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, ValueError) as e:
        return f"its sidecar is unreadable ({e})"
    if not isinstance(meta, dict):
        return "its sidecar is not a JSON object"
    for key, want in expected.items():
        if meta.get(key) != want:
            what = "foreign" if key == "fingerprint" else "stale"
            return f"{what}: {key} is {str(meta.get(key))[:40]!r}, expected {str(want)[:40]!r}"
    if path.stat().st_size != meta.get("bytes"):
        return f"broken: {path.stat().st_size} bytes, the sidecar says {meta.get('bytes')}"
    if file_digest(path) != meta.get("sha256"):
        return "broken: its content hash differs from the sidecar's"
    return None


# -- the exported module ---------------------------------------------------------------------------------------


class BiasInputModel(nn.Module):
    """forward(*token_inputs, biases) -> last_hidden_state[, pooler_output]: every bias read per row from `biases`."""

    def __init__(self, model: nn.Module, mapping: BatchMapping | None, names: list[str], pooler: bool, decoder: bool):
        super().__init__()
        self.model, self.mapping, self.names, self.pooler, self.decoder = model, mapping, names, pooler, decoder

    def forward(self, *inputs: torch.Tensor):
        tokens = dict(zip(self.names, inputs))
        if self.mapping is not None:
            self.mapping.biases = inputs[len(self.names)]  # (b, N)
        try:
            out = self.model(**tokens, **({"use_cache": False} if self.decoder else {}))
        finally:
            if self.mapping is not None:
                self.mapping.biases = None
        return (out.last_hidden_state, out.pooler_output) if self.pooler else out.last_hidden_state


def graph_names(backbone) -> tuple[list[str], list[str]]:
    from server.runtime.inputs import Encoder

    tokens = Encoder(backbone.tokenizer, backbone.max_length).keys
    pooler = getattr(backbone.model, "pooler", None) is not None
    return tokens, ["last_hidden_state"] + (["pooler_output"] if pooler else [])


def bias_input_module(backbone) -> BiasInputModel:
    """A private copy of the backbone, slot biases zeroed, every slot wrapped to read `biases`."""
    model = copy.deepcopy(backbone.model).float().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    layout = backbone.layout
    layout.scatter(model, torch.zeros(layout.size))  # the graph holds no bias: all of them come from the input
    mapping = BatchMapping()
    wrap_slots(model, layout.slots, None, mapping)  # no bank: given biases only
    tokens, outputs = graph_names(backbone)
    return BiasInputModel(model, mapping, tokens, len(outputs) > 1, backbone.is_decoder).eval()


def plain_module(backbone) -> BiasInputModel:
    """The backbone as it is, pre-trained biases inside, no bias input: the reference a benchmark compares with."""
    model = copy.deepcopy(backbone.model).float().eval()
    tokens, outputs = graph_names(backbone)
    return BiasInputModel(model, None, tokens, len(outputs) > 1, backbone.is_decoder).eval()


def example_inputs(backbone, rows: int = 2, seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A padded batch and two visibly different bias rows (pre-trained + noise), for export and its check."""
    from server.runtime.inputs import Encoder

    encoder = Encoder(backbone.tokenizer, backbone.max_length)
    batch = encoder.collate(encoder.encode(EXAMPLE[:rows]))
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(rows, backbone.layout.size, generator=g) * 0.1
    return batch, (backbone.original.unsqueeze(0) + noise).contiguous()  # (rows, N)


def torch_export(module: BiasInputModel, args: tuple, path: Path, inputs: list[str], outputs: list[str]) -> None:
    axes = {name: {0: "batch", 1: "tokens"} for name in inputs if name != BIASES}
    axes |= {BIASES: {0: "batch"}} if BIASES in inputs else {}
    axes |= {"last_hidden_state": {0: "batch", 1: "tokens"}, "pooler_output": {0: "batch"}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python branches: the check below is what counts
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=OPSET, input_names=inputs,
                          output_names=outputs, dynamic_axes={k: v for k, v in axes.items() if k in inputs + outputs},
                          do_constant_folding=True)


def check_graph(path: Path, module: BiasInputModel, batch: dict, biases: torch.Tensor | None, tol: float) -> float:
    """Largest difference between the graph on ONNX Runtime and the eager module, relative to the outputs' scale."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    feeds = {k: v.numpy() for k, v in batch.items() if k in names}
    args = [batch[k] for k in module.names]
    if biases is not None:
        feeds[BIASES], args = biases.numpy(), args + [biases]
    got = session.run(None, feeds)
    with torch.no_grad():
        want = module(*args)
    want = want if isinstance(want, tuple) else (want,)
    mask = batch["attention_mask"].bool()
    worst = 0.0
    for g, w in zip(got, want):
        g = torch.from_numpy(g)
        if g.dim() == 3:  # padded positions of a decoder are never read (last-token pooling): compare real tokens
            g, w = g[mask], w[mask]
        worst = max(worst, float((g - w).abs().max() / (1.0 + w.abs().max())))
    if worst > tol:
        raise ExportFailed(f"the exported graph disagrees with the model by {worst:.2e} (relative; allowed {tol:.0e})")
    return worst


def export_graph(backbone, path: Path, *, plain: bool = False) -> dict:
    """Export the backbone to `path` (the bias-input graph, or `plain`), checked; returns what to record."""
    start = time.perf_counter()
    module = plain_module(backbone) if plain else bias_input_module(backbone)
    batch, biases = example_inputs(backbone)
    tokens, outputs = graph_names(backbone)
    inputs = tokens + ([] if plain else [BIASES])
    args = tuple(batch[k] for k in tokens) + (() if plain else (biases,))
    try:
        torch_export(module, args, path, inputs, outputs)
    except Exception as e:  # any failure inside the exporter: the architecture does not export
        kind = getattr(backbone.model.config, "model_type", type(backbone.model).__name__)
        raise ExportFailed(f"the ONNX Runtime backend cannot export this backbone ({kind}): {type(e).__name__}: "
                           f"{str(e)[:300]}; serve it with --backend torch") from e
    error = check_graph(path, module, batch, None if plain else biases, tol=1e-4)
    return {"inputs": inputs, "outputs": outputs, "check_error": error, "seconds": round(time.perf_counter() - start, 1)}


def quantize_graph(src: Path, dst: Path) -> None:
    """Dynamic int8 weights (activations quantised per batch at run time), from the fp32 graph.

    Per output channel: one scale per column of each weight matrix. Measured on the shipped tasks (600 dev
    examples each), one scale per matrix cost 3.3 points of SST-2 accuracy against fp32, per channel 0.8, for
    about 5 % of the speed; `reduce_range` (7-bit weights, against AVX2's int16 saturation) was worse still.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True)


# -- the cache -------------------------------------------------------------------------------------------------


def ensure_graph(backbone, variant: str = "fp32", cache_dir: Path | None = None) -> Graph:
    """The cached graph of `backbone` for `variant`, exported (and quantised) first if the cache has none that passes."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown graph variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    from filelock import FileLock

    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportFailed(f"cannot write the ONNX graph cache at {cache_dir} ({e}); set BITFIT_ONNX_CACHE "
                           "(or BITFIT_CACHE_DIR) to a writable directory") from e
    fingerprint = backbone.layout.fingerprint
    expected = {"format": FORMAT, "fingerprint": fingerprint, "variant": variant, **versions()}
    path, sidecar = entry_paths(cache_dir, fingerprint, variant)
    with FileLock(str(path) + ".lock"):
        problem = entry_problem(path, sidecar, expected)
        if problem is None:
            meta = json.loads(sidecar.read_text())
            return Graph(path, meta, tuple(meta["inputs"]), tuple(meta["outputs"]), built=False)
        log.warning("ONNX graph %s (%s): %s; building it", path.name, variant, problem)
        if variant == "int8":
            source = ensure_graph(backbone, "fp32", cache_dir)
            made = {"inputs": list(source.inputs), "outputs": list(source.outputs)}
            start = time.perf_counter()
            write_entry(path, sidecar, expected, made, lambda tmp: quantize_graph(source.path, tmp), start)
        else:
            start, made = time.perf_counter(), {}
            write_entry(path, sidecar, expected, made, lambda tmp: made.update(export_graph(backbone, tmp)), start)
        meta = json.loads(sidecar.read_text())
        return Graph(path, meta, tuple(meta["inputs"]), tuple(meta["outputs"]), built=True)


def write_entry(path: Path, sidecar: Path, expected: dict, made: dict, build, start: float) -> None:
    """Build into a temporary file beside `path`, rename it into place, then write the sidecar (the commit mark)."""
    from bitfit.files import write_atomic

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp)
    try:
        sidecar.unlink(missing_ok=True)  # from here until the new sidecar, the entry reads as "not cached"
        build(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        meta = {**expected, **made, "bytes": tmp.stat().st_size, "sha256": file_digest(tmp),
                "built_seconds": round(time.perf_counter() - start, 1)}
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    write_atomic(sidecar, (json.dumps(meta, indent=2) + "\n").encode(), durable=True)
    log.warning("ONNX graph %s built in %.1f s", path.name, meta["built_seconds"])
