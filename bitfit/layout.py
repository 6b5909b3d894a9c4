"""Where a model keeps its biases: the ordered bias slots and the backbone fingerprint.

Slots are found by module type, never by the substring "bias" in a parameter name: T5's
`relative_attention_bias` is an embedding, GPT-2 keeps a causal-mask buffer called `attn.bias`, and
Llama-family models have no biases at all (see `inject.py`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch
from torch import nn

try:  # GPT-2 style models use a transposed linear layer of their own
    from transformers.pytorch_utils import Conv1D as HFConv1D
except ImportError:  # pragma: no cover - transformers is a hard dependency
    HFConv1D = ()

# Order matters only for the `kind` label; a module matches the first type it is an instance of.
SLOT_TYPES: tuple[tuple[type, str], ...] = (
    (nn.Linear, "linear"),
    (HFConv1D, "conv1d"),
    (nn.Conv1d, "conv"),
    (nn.Conv2d, "conv"),
    (nn.LayerNorm, "layer_norm"),
    (nn.GroupNorm, "group_norm"),
)

# Some models define their own norm classes (`...LayerNorm`, `...Norm`) that hold a bias parameter of their own.
_NORM_SUFFIXES = ("LayerNorm", "Norm")


@dataclass(frozen=True)
class BiasSlot:
    path: str  # module path inside the backbone, e.g. "encoder.layer.0.attention.self.query"
    kind: str  # linear | conv1d | conv | layer_norm | group_norm | norm | injected
    size: int  # number of bias scalars
    offset: int  # start of this slot in the flat bias vector


def slot_kind(module: nn.Module) -> str | None:
    """The slot kind of a module whose own `bias` is a trainable parameter, else None."""
    bias = module._parameters.get("bias")  # own parameters only: a buffer named `bias` is not a slot
    if bias is None:
        return None
    if getattr(module, "bitfit_injected", False):
        return "injected"
    for cls, kind in SLOT_TYPES:
        if cls and isinstance(module, cls):
            return kind
    if type(module).__name__.endswith(_NORM_SUFFIXES):
        return "norm"
    return None


def find_slots(model: nn.Module) -> tuple[BiasSlot, ...]:
    """The bias slots of `model` in `named_modules()` order, with their offsets in one flat vector."""
    slots, offset = [], 0
    for path, module in model.named_modules():
        kind = slot_kind(module)
        if kind is None:
            continue
        size = module._parameters["bias"].numel()
        slots.append(BiasSlot(path, kind, size, offset))
        offset += size
    return tuple(slots)


def fingerprint(model: nn.Module, slots: tuple[BiasSlot, ...]) -> str:
    """A hash of the architecture, the slot list and every frozen tensor, taken as float32 on the CPU.

    Two checkpoints of one architecture differ in their weights, so they get different fingerprints;
    the same checkpoint loaded in another dtype or on another device gets the same one, because the
    caller takes it from the float32 weights before casting.
    """
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    arch = {"class": type(model).__name__, "model_type": getattr(config, "model_type", None)}
    h.update(json.dumps(arch, sort_keys=True).encode())
    h.update(json.dumps([(s.path, s.kind, s.size) for s in slots]).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu")
        if t.is_floating_point():
            t = t.to(torch.float32)
        t = t.contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass(frozen=True)
class BiasLayout:
    slots: tuple[BiasSlot, ...]
    fingerprint: str

    @property
    def size(self) -> int:
        return sum(s.size for s in self.slots)

    def modules(self, model: nn.Module) -> list[nn.Module]:
        """The slot modules of `model`, in layout order."""
        return [model.get_submodule(s.path) for s in self.slots]

    def gather(self, model: nn.Module) -> torch.Tensor:
        """The model's current biases as one flat float32 vector on the CPU, in layout order."""
        parts = [m.bias.detach().to("cpu", torch.float32).reshape(-1) for m in self.modules(model)]
        return torch.cat(parts) if parts else torch.zeros(0)

    def scatter(self, model: nn.Module, flat: torch.Tensor) -> None:
        """Copy a flat vector (layout order) into the model's bias parameters."""
        if flat.numel() != self.size:
            raise ValueError(f"flat bias vector has {flat.numel()} values, layout needs {self.size}")
        with torch.no_grad():
            for slot, module in zip(self.slots, self.modules(model)):
                part = flat[slot.offset : slot.offset + slot.size]
                module.bias.copy_(part.view_as(module.bias).to(module.bias.dtype))

    def describe(self) -> dict[str, int]:
        """Slot and scalar counts per kind, for logs and the README."""
        out: dict[str, int] = {}
        for s in self.slots:
            out[s.kind] = out.get(s.kind, 0) + s.size
        return out


def layout_of(model: nn.Module) -> BiasLayout:
    """The layout of a loaded backbone: call it before training moves any bias, or the fingerprint moves too."""
    slots = find_slots(model)
    return BiasLayout(slots, fingerprint(model, slots))
