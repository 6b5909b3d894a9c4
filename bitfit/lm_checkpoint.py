"""Checkpoints of generation models whose result is not a bias set (full FT, LoRA): for `bitfit eval`.

One safetensors file: every tensor the method trained, under its name in the `LanguageModel`
(`backbone.…`), and metadata saying how to rebuild it: the method re-creates the same structure (LoRA's
adapter layers) on a freshly loaded backbone, then the tensors are loaded over it. The backbone
fingerprint is checked first, as for bias sets. Such a file is evaluated, never served.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save as st_save

from bitfit.checkpoint import file_format, load_trained, metadata_list, read_checkpoint
from bitfit.errors import BackboneMismatch
from bitfit.files import write_atomic

FORMAT = "bitfit-lm-model"
FORMAT_VERSION = "1"
REQUIRED_KEYS = ("format", "format_version", "backbone_fingerprint", "task", "method", "seed", "prompt_template", "stop")


@dataclass
class LMCheckpoint:
    task: str
    method: str
    fingerprint: str
    seed: int  # the method's prepare() seed, which fixes e.g. LoRA's structure
    prompt_template: str
    stop: list[str]
    tensors: dict[str, torch.Tensor]  # LanguageModel parameter name -> trained value
    metrics: dict
    train_args: dict

    def build(self, backbone):
        """The trained model on `backbone` (changed in place). Refuses another backbone or unknown tensors."""
        from bitfit.lm import language_model
        from bitfit.methods import get_method

        if self.fingerprint != backbone.layout.fingerprint:
            raise BackboneMismatch(backbone.layout.fingerprint, self.fingerprint, what=f"{self.method} checkpoint")
        model = language_model(backbone)
        get_method(self.method).prepare(model, backbone, self.seed)
        return load_trained(model, self.tensors)


def save_lm_model(model, backbone, task: str, result, config, template: str, stop: list[str], path,
                  train_examples: int | None = None) -> Path:
    """Write the trained tensors and how to rebuild the model, atomically."""
    tensors = {n: p.detach().to("cpu", torch.float32).contiguous() for n, p in model.named_parameters() if p.requires_grad}
    metrics = {k: v for k, v in result.metrics.items() if k not in ("epoch", "seconds")}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "backbone_fingerprint": backbone.layout.fingerprint,
        "task": task,
        "method": config.method,
        "seed": str(config.seed),
        "prompt_template": template,
        "stop": json.dumps(list(stop)),
        "metrics": json.dumps(metrics | {"trainable": result.trainable, "total": result.total}, sort_keys=True),
        "train_args": json.dumps(asdict(config) | {"best_epoch": result.best_epoch, "steps": result.steps,
                                                    "train_examples": train_examples,
                                                    "seconds": round(result.seconds, 1)}, sort_keys=True),
    }
    return write_atomic(path, st_save(tensors, metadata=meta))


def is_lm_model(path) -> bool:
    """Whether the file at `path` claims to be an LM checkpoint (reads the header only)."""
    return file_format(path) == FORMAT


def load_lm_model(path) -> LMCheckpoint:
    tensors, meta, metrics, train_args, seed = read_checkpoint(path, FORMAT, FORMAT_VERSION, REQUIRED_KEYS)
    return LMCheckpoint(meta["task"], meta["method"], meta["backbone_fingerprint"], seed, meta["prompt_template"],
                        metadata_list(meta, "stop"), tensors, metrics, train_args)
