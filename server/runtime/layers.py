"""Banked-bias layers: each bias slot's module, wrapped once at engine start, reads its bias per row from the bank.

vLLM's LoRA layers do this for LoRA (`vllm/lora/layers/`): a wrapper per base layer type, a shared mapping set
once per batch, `from_layer` picking the first wrapper that accepts a module. Here:

- swap batch (`mapping.rows is None`): the wrapper runs its base module unchanged; the module's bias is a view
  into the engine's flat buffer, which holds the one task of the batch;
- gather batch (`mapping.rows` a LongTensor [batch] of bank rows): the wrapper runs the base computation without
  any bias and adds, in place, each row's own slice of the bank (`bank.rows[rows, offset:offset + size]`),
  broadcast over every dimension but the batch and the channel one;
- given biases (`mapping.biases`, (batch, N)): the same, reading each row's slice from that tensor — how a graph
  exported for another runtime takes every bias as one input.

No forward hooks, no toggling of `_parameters`; the branch on `mapping.rows` is plain Python, so `torch.compile`
traces one graph per mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bitfit.layout import HFConv1D, BiasSlot


@dataclass
class BatchMapping:
    """Which bank row each input of the running batch reads its biases from: plain data, set once per batch."""

    rows: torch.Tensor | None = None  # LongTensor [batch] on the device; None: a swap batch
    # or each row's biases given whole, (batch, N) in layout order: what an exported graph takes as an input
    # (the ONNX Runtime backend gathers it from the bank per batch, so the graph never holds task weights)
    biases: torch.Tensor | None = None

    @property
    def per_row(self) -> bool:
        return self.rows is not None or self.biases is not None


class BankedBias(nn.Module):
    """The generic wrapper: any module whose own `bias` parameter is added along `channel_dim` of its output.

    In a gather batch the base module runs with its own bias (the engine zeroes the flat buffer first, so that
    bias is zero) and the rows' biases are added after; subclasses skip that pass over zeros.
    """

    channel_dim = -1

    def __init__(self, base: nn.Module, slot: BiasSlot, bank, mapping: BatchMapping):
        super().__init__()
        self.base = base
        self.path, self.offset, self.size = slot.path, slot.offset, slot.size
        self.bank = bank  # read at call time: the bank reallocates its table when it grows
        self.mapping = mapping

    @property
    def bias(self) -> torch.Tensor:
        return self.base.bias

    @property
    def weight(self) -> torch.Tensor:  # some models read a projection's weight from outside (tied heads, dtype checks)
        return self.base.weight

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not self.mapping.per_row:
            return self.base(x, *args, **kwargs)
        return self.add_rows(self.unbiased(x, *args, **kwargs))

    def unbiased(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.base(x, *args, **kwargs)

    def add_rows(self, out: torch.Tensor) -> torch.Tensor:
        rows, given = self.mapping.rows, self.mapping.biases
        if given is not None:
            part = given[:, self.offset : self.offset + self.size]  # (b, size)
        else:
            table = self.bank.rows[:, self.offset : self.offset + self.size]  # (capacity, size), a view
            part = torch.index_select(table, 0, rows)  # (b, size)
        b, dim = part.shape[0], self.channel_dim % out.dim()
        if out.shape[0] != b or out.shape[dim] != self.size:
            # a silent broadcast here would mix the rows of different tasks: refuse instead
            raise RuntimeError(f"{self.path}: cannot add ({b}, {self.size}) row biases to an output of shape "
                               f"{tuple(out.shape)} along dim {dim}")
        shape = [1] * out.dim()
        shape[0], shape[dim] = b, self.size
        return out.add_(part.view(shape))  # (b, t, size) += (b, 1, size); (b, h) += (b, h) for a pooler

    def extra_repr(self) -> str:
        return f"{self.path}: bank[{self.offset}:{self.offset + self.size}], channel dim {self.channel_dim}"


class BankedLinear(BankedBias):
    def unbiased(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.base.weight)


class BankedConv1D(BankedBias):
    """GPT-2's transposed linear layer (`transformers.pytorch_utils.Conv1D`): weight (in, out)."""

    def unbiased(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1] + (self.base.nf,)
        return torch.mm(x.reshape(-1, x.shape[-1]), self.base.weight).view(shape)


class BankedLayerNorm(BankedBias):
    def unbiased(self, x: torch.Tensor) -> torch.Tensor:
        m = self.base
        return F.layer_norm(x, m.normalized_shape, m.weight, None, m.eps)


class BankedConv(BankedBias):
    """nn.Conv1d / nn.Conv2d: channels first, so the bias goes along dim 1."""

    channel_dim = 1

    def unbiased(self, x: torch.Tensor) -> torch.Tensor:
        return self.base._conv_forward(x, self.base.weight, None)


class BankedChannelsFirst(BankedBias):
    """A subclass of a channels-first module (its own forward may differ): generic, along dim 1."""

    channel_dim = 1


class BankedGroupNorm(BankedBias):
    channel_dim = 1

    def unbiased(self, x: torch.Tensor) -> torch.Tensor:
        m = self.base
        return F.group_norm(x, m.num_groups, m.weight, None, m.eps)


# Exact types first: a subclass may use its bias its own way, so it gets the generic wrapper.
WRAPPERS: tuple[tuple[type, type[BankedBias]], ...] = (
    (nn.Linear, BankedLinear),
    (nn.LayerNorm, BankedLayerNorm),
    (nn.Conv1d, BankedConv),
    (nn.Conv2d, BankedConv),
    (nn.GroupNorm, BankedGroupNorm),
) + (((HFConv1D, BankedConv1D),) if HFConv1D else ())


def from_layer(module: nn.Module) -> type[BankedBias]:
    """The wrapper class for a slot module: the one for its exact type, else the generic one."""
    for cls, wrapper in WRAPPERS:
        if type(module) is cls:
            return wrapper
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.GroupNorm)):
        return BankedChannelsFirst
    return BankedBias


def replace_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, new)


def wrap_slots(model: nn.Module, slots, bank, mapping: BatchMapping) -> list[BankedBias]:
    """Wrap every slot module of `model` once; returns the wrappers in layout order."""
    wrapped = []
    for slot in slots:
        module = model.get_submodule(slot.path)
        if isinstance(module, BankedBias):
            raise RuntimeError(f"{slot.path} is wrapped already: wrap a model once")
        layer = from_layer(module)(module, slot, bank, mapping)
        replace_submodule(model, slot.path, layer)
        wrapped.append(layer)
    return wrapped


def needs_zero_flat(layers: list[BankedBias]) -> bool:
    """Whether some wrapper runs its base with its own bias in a gather batch (so that bias must be zero)."""
    return any(type(layer).unbiased is BankedBias.unbiased for layer in layers)


__all__ = ["BankedBias", "BatchMapping", "from_layer", "needs_zero_flat", "wrap_slots"]
