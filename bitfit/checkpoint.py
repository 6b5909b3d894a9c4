"""Checkpoints of methods whose result is not a bias set (full FT, LoRA, random subsets).

One safetensors file: every tensor the method trained, under its name in the TaskModel (`backbone.…`,
`head.…`; LoRA's adapter tensors under their PEFT names), and metadata saying how to rebuild the model:
the method, which re-creates the same structure (LoRA's adapter layers) on a freshly loaded backbone,
then the tensors are loaded over it. The backbone fingerprint is checked first, as for bias sets. Such a
file can be evaluated (`bitfit eval`) but not served: the server only swaps biases.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from bitfit.backbone import Backbone
from bitfit.bias_set import read_metadata
from bitfit.files import write_atomic
from bitfit.errors import BackboneMismatch, BiasSetFormatError
from bitfit.heads import TaskHead, TaskModel

FORMAT = "bitfit-task-model"
FORMAT_VERSION = "1"
REQUIRED_KEYS = ("format", "format_version", "backbone_fingerprint", "task", "labels", "pooling", "method", "seed")


@dataclass
class TaskCheckpoint:
    task: str
    method: str
    labels: list[str]  # [] for regression
    pooling: str
    fingerprint: str
    seed: int  # the method's prepare() seed, which fixes e.g. LoRA's structure
    tensors: dict[str, torch.Tensor]  # TaskModel parameter name -> trained value
    metrics: dict
    train_args: dict

    @property
    def num_outputs(self) -> int:
        return len(self.labels) or 1

    def build(self, backbone: Backbone) -> TaskModel:
        """The trained task model on `backbone` (changed in place). Refuses another backbone or unknown tensors."""
        from bitfit.methods import get_method

        if self.fingerprint != backbone.layout.fingerprint:
            raise BackboneMismatch(backbone.layout.fingerprint, self.fingerprint, what=f"{self.method} checkpoint")
        model = TaskModel(backbone.model, TaskHead(backbone.hidden_size, self.num_outputs, self.pooling))
        get_method(self.method).prepare(model, backbone, self.seed)
        return load_trained(model, self.tensors)


def save_task_model(model: TaskModel, backbone: Backbone, data, result, config, path) -> Path:
    """Write the trained tensors and how to rebuild the model, atomically (temporary file, fsync, rename)."""
    from bitfit.methods import trainable_scalars

    tensors = {n: p.detach().to("cpu", torch.float32).contiguous() for n, p in model.named_parameters() if p.requires_grad}
    metrics = {k: v for k, v in result.metrics.items() if k not in ("epoch", "seconds")}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "backbone_fingerprint": backbone.layout.fingerprint,
        "task": data.spec.name,
        "labels": json.dumps(list(data.spec.labels)),
        "pooling": model.head.pooling,
        "method": config.method,
        "seed": str(config.seed),
        "metrics": json.dumps(metrics | {"trainable": trainable_scalars(model), "total": result.total}, sort_keys=True),
        "train_args": json.dumps(asdict(config) | {"best_epoch": result.best_epoch}, sort_keys=True),
    }
    return write_atomic(path, st_save(tensors, metadata=meta))


def load_trained(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Copy a checkpoint's trained tensors over `model`'s parameters of the same names; refuses names the model
    lacks and shapes it does not have, before changing anything."""
    params = dict(model.named_parameters())
    problems = [f"{k}: not a parameter of the model" for k in tensors if k not in params]
    problems += [f"{k}: shape {tuple(v.shape)}, the model has {tuple(params[k].shape)}"
                 for k, v in tensors.items() if k in params and v.shape != params[k].shape]
    if problems:
        raise BiasSetFormatError(f"checkpoint does not fit the model: {'; '.join(problems[:5])}")
    with torch.no_grad():
        for k, v in tensors.items():
            params[k].copy_(v.to(params[k].dtype))
    return model.eval()


def file_format(path) -> str | None:
    """The `format` a safetensors file's metadata claims, reading the header only (None: not such a file)."""
    path = Path(path)
    if not path.is_file():
        return None
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return None
        n = int.from_bytes(head, "little")
        if n > 100_000_000:
            return None
        data = head + f.read(n)
    try:
        return read_metadata(data).get("format")
    except BiasSetFormatError:
        return None


def read_checkpoint(path, fmt: str, version: str, required: tuple[str, ...]) -> tuple[dict, dict, dict, dict, int]:
    """A checkpoint file's tensors, metadata, metrics, train_args and seed, its format and keys checked."""
    path = Path(path)
    if not path.is_file():
        raise BiasSetFormatError(f"no checkpoint file at {path}")
    data = path.read_bytes()
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, RuntimeError, OSError) as e:
        raise BiasSetFormatError(f"not a safetensors file: {e}") from None
    meta = read_metadata(data)
    missing = [k for k in required if k not in meta]
    if missing:
        raise BiasSetFormatError(f"checkpoint metadata lacks {missing}")
    if meta["format"] != fmt or meta["format_version"] != version:
        raise BiasSetFormatError(f"not a {fmt} v{version} file ({meta['format']} v{meta['format_version']})")
    try:
        metrics = json.loads(meta.get("metrics", "{}"))
        train_args = json.loads(meta.get("train_args", "{}"))
        seed = int(meta["seed"])
    except (json.JSONDecodeError, ValueError) as e:
        raise BiasSetFormatError(f"checkpoint metadata is malformed: {e}") from None
    return tensors, meta, metrics, train_args, seed


def metadata_list(meta: dict, key: str) -> list:
    try:
        return json.loads(meta[key])
    except json.JSONDecodeError as e:
        raise BiasSetFormatError(f"checkpoint metadata is malformed: {key}: {e}") from None


def is_task_model(path) -> bool:
    """Whether the file at `path` claims to be a task-model checkpoint (reads the header only)."""
    return file_format(path) == FORMAT


def load_task_model(path) -> TaskCheckpoint:
    tensors, meta, metrics, train_args, seed = read_checkpoint(path, FORMAT, FORMAT_VERSION, REQUIRED_KEYS)
    return TaskCheckpoint(meta["task"], meta["method"], metadata_list(meta, "labels"), meta["pooling"],
                          meta["backbone_fingerprint"], seed, tensors, metrics, train_args)
