"""The BiasSet artifact: one safetensors file holding a task.

Tensors:  `delta` (float32, [layout size]) = trained bias − original bias, in layout order;
          `head.out.weight` ([outputs, hidden]) and `head.out.bias` ([outputs]) — a classification set's.
Metadata: format and version, backbone fingerprint, task, labels (empty list = regression), pooling,
          input kind (text or pair; optional), training method, metrics and training arguments
          (JSON strings, as safetensors keeps str → str).

Two kinds (metadata `kind`; a file without it is a classification set, as every file before it was):
- classification: the head tensors, labels and pooling above;
- generation: `delta` only (the backbone's own LM head writes the text), no labels and no pooling, and
  `prompt_template` (the prompt, with `{input}` where the input goes) and `stop` (a JSON list of stop
  sequences), which whoever generates with the set applies.

safetensors carries no code, so reading a file can never execute anything. A zero delta is the base
model, and deltas add, which keeps task arithmetic possible.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from bitfit.errors import BackboneMismatch, BiasSetFormatError
from bitfit.files import write_atomic
from bitfit.layout import BiasLayout

FORMAT = "bitfit-bias-set"
FORMAT_VERSION = "1"
HEAD_PREFIX = "head."
DELTA = "delta"
# metadata keys whose values are JSON; the rest are plain strings
JSON_KEYS = ("labels", "metrics", "train_args", "injected")
REQUIRED_KEYS = ("format", "format_version", "backbone_fingerprint", "layout_size", "task", "labels", "pooling", "method")
INPUT_KINDS = ("text", "pair")  # what one input of the task is: a text, or a pair of texts
CLASSIFICATION, GENERATION = "classification", "generation"
KINDS = (CLASSIFICATION, GENERATION)  # metadata `kind`; absent: classification
GENERATION_KEYS = ("kind", "prompt_template", "stop")  # required of a generation set, unknown to a classification one
CLASSIFICATION_ONLY_KEYS = ("labels", "pooling", "input_kind")  # a generation set has no head to describe


def required_keys(kind: str) -> tuple[str, ...]:
    """The metadata keys a bias set of `kind` must hold."""
    if kind == GENERATION:
        return tuple(k for k in REQUIRED_KEYS if k not in CLASSIFICATION_ONLY_KEYS) + GENERATION_KEYS
    return REQUIRED_KEYS


@dataclass
class BiasSet:
    task: str
    delta: torch.Tensor  # (layout size,) float32
    head: dict[str, torch.Tensor]  # "out.weight" (n, h), "out.bias" (n,)
    labels: list[str]  # class names in output order; [] for a regression task
    fingerprint: str  # of the backbone it was trained on
    pooling: str = "mean"
    method: str = "bitfit"
    metrics: dict = field(default_factory=dict)
    train_args: dict = field(default_factory=dict)
    injected: list[str] = field(default_factory=list)
    input_kind: str | None = None  # "text" | "pair"; None: not recorded (files from before it was), any is served
    kind: str = CLASSIFICATION  # or GENERATION: no head, labels or pooling; a prompt template and stop sequences
    prompt_template: str | None = None  # generation: the prompt, "{input}" where the task input goes
    stop: list[str] = field(default_factory=list)  # generation: generated text ends before the first of these
    created_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @property
    def is_generation(self) -> bool:
        return self.kind == GENERATION

    @property
    def is_regression(self) -> bool:
        return not self.labels and not self.is_generation

    @property
    def num_outputs(self) -> int:
        return 1 if self.is_regression else len(self.labels)

    def metadata(self) -> dict[str, str]:
        if self.is_generation:
            meta = {k: v for k, v in self._metadata().items() if k not in CLASSIFICATION_ONLY_KEYS}
            return meta | {"kind": GENERATION, "prompt_template": self.prompt_template or "",
                           "stop": json.dumps(list(self.stop))}
        return self._metadata()

    def _metadata(self) -> dict[str, str]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "backbone_fingerprint": self.fingerprint,
            "layout_size": str(self.delta.numel()),
            "task": self.task,
            "labels": json.dumps(self.labels),
            "pooling": self.pooling,
            "method": self.method,
            "metrics": json.dumps(self.metrics, sort_keys=True),
            "train_args": json.dumps(self.train_args, sort_keys=True),
            "injected": json.dumps(self.injected),
            "created_at": self.created_at,
        } | ({"input_kind": self.input_kind} if self.input_kind is not None else {})

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {DELTA: self.delta.detach().to("cpu", torch.float32).contiguous()}
        for k, v in self.head.items():
            out[HEAD_PREFIX + k] = v.detach().to("cpu", torch.float32).contiguous()
        return out

    def to_bytes(self) -> bytes:
        return st_save(self.tensors(), metadata=self.metadata())

    @classmethod
    def from_bytes(cls, data: bytes) -> "BiasSet":
        """Parse a file's bytes; raises BiasSetFormatError on anything that is not a bias set."""
        meta = read_metadata(data)
        try:
            tensors = st_load(data)
        except (SafetensorError, ValueError, RuntimeError, OSError) as e:
            raise BiasSetFormatError(f"not a safetensors file: {e}") from None
        return cls.from_parts(tensors, meta)

    @classmethod
    def from_parts(cls, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> "BiasSet":
        kind = meta.get("kind", CLASSIFICATION)
        if kind not in KINDS:
            raise BiasSetFormatError(f"metadata kind {kind[:32]!r} is not one of {', '.join(KINDS)}")
        missing = [k for k in required_keys(kind) if k not in meta]
        if missing:
            raise BiasSetFormatError(f"metadata lacks {missing}")
        if meta["format"] != FORMAT:
            raise BiasSetFormatError(f"metadata format is {meta['format']!r}, expected {FORMAT!r}")
        if meta["format_version"] != FORMAT_VERSION:
            raise BiasSetFormatError(f"format_version {meta['format_version']!r} is not supported (want {FORMAT_VERSION})")
        parsed = {}
        for k in JSON_KEYS:
            try:
                parsed[k] = json.loads(meta.get(k, "[]" if k in ("labels", "injected") else "{}"))
            except json.JSONDecodeError as e:
                raise BiasSetFormatError(f"metadata {k!r} is not valid JSON: {e}") from None
        if DELTA not in tensors:
            raise BiasSetFormatError("file has no 'delta' tensor")
        head = {k[len(HEAD_PREFIX) :]: v for k, v in tensors.items() if k.startswith(HEAD_PREFIX)}
        stop = []
        if kind == GENERATION:
            try:
                stop = json.loads(meta["stop"])
            except json.JSONDecodeError as e:
                raise BiasSetFormatError(f"metadata 'stop' is not valid JSON: {e}") from None
            if not (isinstance(stop, list) and all(isinstance(x, str) for x in stop)):
                raise BiasSetFormatError("metadata 'stop' must be a JSON list of strings")
        return cls(
            task=meta["task"],
            delta=tensors[DELTA],
            head=head,
            labels=parsed["labels"],
            fingerprint=meta["backbone_fingerprint"],
            pooling=meta.get("pooling", ""),
            method=meta["method"],
            metrics=parsed["metrics"],
            train_args=parsed["train_args"],
            injected=parsed["injected"],
            input_kind=meta.get("input_kind"),
            kind=kind,
            prompt_template=meta.get("prompt_template"),
            stop=stop,
            created_at=meta.get("created_at", ""),
        )

    def check_backbone(self, layout: BiasLayout) -> None:
        if self.fingerprint != layout.fingerprint:
            raise BackboneMismatch(layout.fingerprint, self.fingerprint, what=f"bias set for task {self.task!r}")
        if self.delta.numel() != layout.size:
            raise BiasSetFormatError(f"delta has {self.delta.numel()} values, the backbone layout has {layout.size}")

    def absolute_biases(self, original: torch.Tensor) -> torch.Tensor:
        """original + delta: the task's biases in layout order."""
        return original + self.delta.to(original.dtype)


def read_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors file, read from its JSON header without loading tensors."""
    if len(data) < 8:
        raise BiasSetFormatError("file is too short to be safetensors")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise BiasSetFormatError("not a safetensors file: its header length is longer than the file")
    try:
        header = json.loads(data[8 : 8 + n])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BiasSetFormatError(f"safetensors header is not JSON: {e}") from None
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise BiasSetFormatError("safetensors __metadata__ is not an object")
    return meta


def save_bias_set(bias_set: "BiasSet | torch.nn.Module", path: str | os.PathLike, **fields) -> Path:
    """Write a bias set file atomically: a `BiasSet`, or the one of a model `apply_bitfit` prepared.

    `save_bias_set(bias_set, path)`; `save_bias_set(model, path, task=..., labels=..., input_kind=...)`
    (the fields of `bitfit.hf_model.bias_set_from_model`, which a BiasSet already carries)."""
    if isinstance(bias_set, BiasSet):
        if fields:
            raise TypeError(f"save_bias_set(BiasSet, path) takes no {', '.join(sorted(fields))}: the BiasSet "
                            "carries them (they describe a model's set: save_bias_set(model, path, task=...))")
        return write_atomic(path, bias_set.to_bytes())
    from bitfit.hf_model import bias_set_from_model  # a model: needs transformers-aware code, loaded on use

    return write_atomic(path, bias_set_from_model(bias_set, **fields).to_bytes())


def load_bias_set(path: str | os.PathLike) -> BiasSet:
    path = Path(path)
    if not path.is_file():
        raise BiasSetFormatError(f"no bias set file at {path}")
    return BiasSet.from_bytes(path.read_bytes())
