"""Choosing and building an engine: the seam between the runner and a backend.

An engine is what the runner drives: `spec` (the serving spec), `bank` (the task rows and heads),
`encoder` (tokenise, pad), `collate(encoded)`, `run(batch, rows, mode) -> BatchOutput`, and `name`. Two backends:
torch (`engine.py`; CPU or GPU) and onnxruntime (`onnx_engine.py`; CPU, the backbone exported once per
fingerprint and cached, optionally with int8 weights).
"""

from __future__ import annotations

from server.settings import BACKENDS


def build_engine(settings):
    """Load the backbone once (float32; layout, fingerprint and spec taken), then hand it to the chosen backend."""
    import torch

    from bitfit.backbone import load_backbone

    if settings.backend not in BACKENDS:
        raise ValueError(f"backend {settings.backend!r} is not one of {', '.join(BACKENDS)}")
    if settings.threads:
        torch.set_num_threads(settings.threads)  # the torch engine's forward; heads and pooling on either backend
    backbone = load_backbone(settings.backbone)
    if settings.backend == "onnxruntime":
        from server.runtime.onnx_engine import OrtEngine

        return OrtEngine(backbone, quantize=settings.quantize, threads=settings.ort_threads or settings.threads,
                         cache_dir=settings.onnx_cache)
    from server.runtime.engine import TorchEngine

    return TorchEngine(backbone, device=settings.device, dtype=settings.dtype, compile=settings.compile)


__all__ = ["BACKENDS", "build_engine"]
