"""Zero biases for layers that have none, and freezing everything but the biases and the head.

Llama, Mistral, SmolLM2 and T5 have no bias terms: a name-based BitFit trains nothing on them. We add
a zero-initialised bias parameter to their linear projections, which leaves every output bit-for-bit
unchanged until training moves it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

from bitfit.errors import BitfitError
from bitfit.layout import HFConv1D, find_slots

log = logging.getLogger(__name__)


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or bool(HFConv1D and isinstance(module, HFConv1D))


def injectable(module: nn.Module) -> bool:
    """A linear projection without a bias of its own."""
    return is_linear(module) and module._parameters.get("bias") is None


def inject_biases(model: nn.Module, targets: Iterable[str] | None = None) -> list[str]:
    """Give every bias-less linear layer (or only those whose last name is in `targets`) a zero bias.

    Returns the module paths that got one. Idempotent: a layer with a bias is left alone.
    """
    wanted = set(targets) if targets is not None else None
    if wanted is not None:
        names = {path.rsplit(".", 1)[-1] for path, m in model.named_modules() if is_linear(m)}
        if wanted - names:
            raise BitfitError(f"no linear layer is named {sorted(wanted - names)}; candidates are {sorted(names)}")
    injected = []
    for path, module in model.named_modules():
        if not injectable(module):
            continue
        if wanted is not None and path.rsplit(".", 1)[-1] not in wanted:
            continue
        weight = module.weight
        out_features = weight.shape[1] if (HFConv1D and isinstance(module, HFConv1D)) else weight.shape[0]
        module.bias = nn.Parameter(torch.zeros(out_features, dtype=weight.dtype, device=weight.device))
        module.bitfit_injected = True
        injected.append(path)
    return injected


def apply_bitfit(backbone: nn.Module, head: nn.Module | None = None) -> tuple[int, int, float]:
    """Freeze everything but the bias slots of `backbone` and all of `head`.

    Returns (trainable, total, share in %) and logs them as one line.
    """
    slot_paths = {s.path for s in find_slots(backbone)}
    if not slot_paths:
        raise BitfitError("the backbone has no bias slots; call inject_biases() first for bias-less models")
    for p in backbone.parameters():
        p.requires_grad_(False)
    for path in slot_paths:
        backbone.get_submodule(path).bias.requires_grad_(True)
    modules = [backbone] + ([head] if head is not None else [])
    if head is not None:
        for p in head.parameters():
            p.requires_grad_(True)
    return count_trainable(*modules)


def count_trainable(*modules: nn.Module) -> tuple[int, int, float]:
    params = {id(p): p for m in modules for p in m.parameters()}.values()
    n_total = sum(p.numel() for p in params)
    n_train = sum(p.numel() for p in params if p.requires_grad)
    pct = 100.0 * n_train / max(n_total, 1)
    log.info(f"trainable {n_train:,} / {n_total:,} ({pct:.2f} %)")
    return n_train, n_total, pct
