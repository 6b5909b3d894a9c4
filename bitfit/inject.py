"""Zero biases for layers that have none, and freezing everything but the biases and the task head.

Llama, Mistral, SmolLM2 and T5 have no bias terms: a name-based BitFit trains nothing on them. We add
a zero-initialised bias parameter to their linear projections, which leaves every output bit-for-bit
unchanged until training moves it.

`apply_bitfit(model)` is the entry point for a `transformers` model with or without a task head: it
injects into the backbone (`model.base_model`) only, never into the head, and records on the backbone
what a bias set later needs and training would destroy: the layout with its fingerprint, and the
pre-trained biases (`BitfitState`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from bitfit.errors import BitfitError
from bitfit.heads import TaskModel
from bitfit.layout import HFConv1D, BiasLayout, BiasSlot, find_slots, layout_of

log = logging.getLogger(__name__)

STATE = "bitfit_state"  # attribute of the backbone module that holds its BitfitState
SLOT_PRESETS = ("all", "bq-bm2")


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or bool(HFConv1D and isinstance(module, HFConv1D))


def injectable(module: nn.Module) -> bool:
    """A linear projection without a bias of its own."""
    return is_linear(module) and module._parameters.get("bias") is None


def _give_zero_bias(module: nn.Module) -> None:
    weight = module.weight
    out_features = weight.shape[1] if (HFConv1D and isinstance(module, HFConv1D)) else weight.shape[0]
    module.bias = nn.Parameter(torch.zeros(out_features, dtype=weight.dtype, device=weight.device))
    module.bitfit_injected = True


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
        _give_zero_bias(module)
        injected.append(path)
    return injected


def inject_at(model: nn.Module, paths: Iterable[str]) -> list[str]:
    """Zero biases at exactly these module paths (a bias set's `injected` list); returns those that got one.

    Raises BitfitError, changing nothing, when a path is missing or not a linear layer."""
    paths = list(paths)
    modules = dict(model.named_modules())
    bad = [p for p in paths if p not in modules or not is_linear(modules[p])]
    if bad:
        raise BitfitError(f"the model has no linear layer at {bad[:4]}{' …' if len(bad) > 4 else ''}, "
                          "where the bias set's backbone had an injected bias")
    new = [p for p in paths if injectable(modules[p])]
    for p in new:
        _give_zero_bias(modules[p])
    return new


def remove_injected(model: nn.Module, paths: Iterable[str]) -> None:
    """Undo `inject_at` (for a load that failed after injecting)."""
    for p in paths:
        module = model.get_submodule(p)
        module.bias = None
        module.__dict__.pop("bitfit_injected", None)


# ---------------------------------------------------------------------------------------------
# What apply_bitfit records, and which parameters it trains


@dataclass
class BitfitState:
    slots: tuple[BiasSlot, ...]  # the backbone's bias slots when apply_bitfit ran
    layout: BiasLayout | None  # with the fingerprint; None on the meta device (nothing to hash)
    original: torch.Tensor | None  # (layout size,) float32 pre-trained biases, layout order; None on meta
    injected: list[str]  # module paths that were given a zero bias
    trained: list[str]  # slot paths left trainable (all of them unless `slots=` chose)


def base_of(model: nn.Module) -> nn.Module:
    """The backbone of a `transformers` model: `base_model` (itself for a bare AutoModel); a TaskModel's backbone."""
    if isinstance(model, TaskModel):
        return model.backbone
    base = getattr(model, "base_model", None)
    return base if isinstance(base, nn.Module) else model


def head_parameters(model: nn.Module, base: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Every parameter outside the backbone: the task head (`classifier`, `score`, RoBERTa's two layers).

    A language model's output embeddings (`lm_head`) are pre-trained, not a task head, so they stay frozen."""
    inside = {id(p) for p in base.parameters()}
    lm = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inside |= {id(p) for p in lm.parameters()} if isinstance(lm, nn.Module) else set()
    return [(n, p) for n, p in model.named_parameters() if id(p) not in inside]


def on_meta(module: nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters())


def record_state(base: nn.Module, injected: list[str], layout: BiasLayout | None = None) -> BitfitState:
    """Take the layout, fingerprint and original biases once; a later call on the same backbone keeps them.

    `layout`: one the caller just took of `base` (so it is not hashed twice)."""
    slots = find_slots(base)
    state = getattr(base, STATE, None)
    if state is not None:
        if [s.path for s in slots] != [s.path for s in state.slots]:
            raise BitfitError("apply_bitfit already ran on this model with other bias slots; load a fresh model "
                              "to choose again (its biases may have been trained since)")
        state.injected += [p for p in injected if p not in state.injected]
        return state
    if on_meta(base):
        state = BitfitState(slots, None, None, list(injected), [])
    else:
        layout = layout or layout_of(base)
        state = BitfitState(slots, layout, layout.gather(base), list(injected), [])
    base.__dict__[STATE] = state  # a plain attribute, not a submodule or buffer: it never enters the state dict
    return state


def adopt_state(base: nn.Module, layout: BiasLayout, original: torch.Tensor, injected: list[str]) -> BitfitState:
    """Record what a loader already took (`bitfit.backbone.Backbone`), replacing any earlier record."""
    state = BitfitState(layout.slots, layout, original, list(injected), [])
    base.__dict__[STATE] = state
    return state


def chosen_slots(slots: tuple[BiasSlot, ...], choice) -> list[tuple[BiasSlot, str]]:
    """(slot, role) to train: role "whole", or "query-third" for GPT-2's fused q/k/v under bq-bm2.

    `choice`: None or "all"; "bq-bm2" (the paper's query and MLP-intermediate biases); or module names,
    each the last part of a slot's path ("q_proj") or a dotted suffix of it ("intermediate.dense")."""
    if choice is None or choice == "all":
        return [(s, "whole") for s in slots]
    if choice == "bq-bm2":
        from bitfit.methods import (FUSED_QKV_NAMES, INTERMEDIATE_NAMES, INTERMEDIATE_PATHS, PROJECTION_KINDS,
                                    QUERY_NAMES)

        out, roles = [], set()
        for s in slots:
            name = s.path.rsplit(".", 1)[-1]
            if s.kind not in PROJECTION_KINDS:
                continue
            if name in INTERMEDIATE_NAMES or s.path.endswith(INTERMEDIATE_PATHS):
                out.append((s, "whole"))
                roles.add("intermediate")
            elif name in QUERY_NAMES or name in FUSED_QKV_NAMES:
                out.append((s, "whole" if name in QUERY_NAMES else "query-third"))
                roles.add("query")
        if roles != {"query", "intermediate"}:
            raise BitfitError(f"slots='bq-bm2' found {sorted(roles) or 'neither'} of the query and MLP-intermediate "
                              f"bias slots; name them instead, e.g. slots=['q_proj', 'up_proj'] (this model's slots "
                              f"are named {sorted(slot_names(slots))})")
        return out
    if isinstance(choice, str):
        raise BitfitError(f"slots={choice!r} is not one of {SLOT_PRESETS}; for module names pass a list, "
                          f"e.g. slots=[{choice!r}]")
    names = list(choice)
    matches = {n: [s for s in slots if s.path == n or s.path.endswith("." + n)] for n in names}
    unknown = [n for n, found in matches.items() if not found]
    if unknown:
        raise BitfitError(f"no bias slot is named {unknown}; this model's slots are named {sorted(slot_names(slots))} "
                          "(a bias-less layer gets a slot only if it is injected: see inject=)")
    picked = {s.path for found in matches.values() for s in found}
    return [(s, "whole") for s in slots if s.path in picked]


def slot_names(slots) -> set[str]:
    return {s.path.rsplit(".", 1)[-1] for s in slots}


def apply_bitfit(
    model: nn.Module,
    head: nn.Module | None = None,
    *,
    slots: str | Iterable[str] | None = None,
    inject: bool | Iterable[str] | None = None,
    verbose: bool = True,
) -> nn.Module:
    """Prepare `model` for BitFit in place and return it: only bias terms and the task head train.

    `model` is any `transformers` model: with a task head (`…ForSequenceClassification`,
    `…ForTokenClassification`: everything outside `model.base_model` trains in full) or a bare backbone,
    optionally with a separate `head` module (the `TaskModel` form `bitfit train` uses).
    `inject`: True gives every bias-less linear layer of the backbone a zero bias (as `bitfit train` does),
    a list of names only those (`--inject`), False none; None (default) is True for a model alone and False
    for the (backbone, head) form, whose backbone `load_backbone` has injected already.
    `slots`: which bias slots train: all (default), "bq-bm2" (query and MLP-intermediate, the paper's
    subset), or a list of module names. Slots left out stay frozen, so their delta is zero.
    Prints `Trainable: n / total (share%)` unless `verbose=False`.
    """
    base = base_of(model)
    if inject is None:
        inject = head is None and not isinstance(model, TaskModel)
    if inject is True:
        injected = inject_biases(base)
    elif inject is False:
        injected = []
    else:
        injected = inject_biases(base, inject)
    try:  # a refused choice leaves the model as it was
        found = find_slots(base)
        if not found:
            raise BitfitError(f"{type(base).__name__} has no bias slots (no layer has a bias, and none was "
                              "injected); pass inject=True to give its linear layers zero biases")
        picked = chosen_slots(found, slots)
        state = record_state(base, injected)
    except BitfitError:
        remove_injected(base, injected)
        raise

    extra = head_parameters(model, base) + (list(head.named_parameters()) if head is not None else [])
    for p in list(model.parameters()) + [p for _, p in extra]:
        p.requires_grad_(False)
    for slot, role in picked:
        bias = base.get_submodule(slot.path).bias
        if role == "query-third":  # GPT-2's c_attn is [q | k | v]: train the first third only
            from bitfit.methods import mask_parameter

            mask = torch.zeros_like(bias, dtype=torch.bool)
            mask[: bias.numel() // 3] = True
            mask_parameter(bias, mask)
        else:
            bias.requires_grad_(True)
    for _, p in extra:
        p.requires_grad_(True)
    state.trained = [s.path for s, _ in picked]
    if verbose:
        modules = [model] + ([head] if head is not None else [])
        print(trainable_line(*count_trainable(*modules)[:2]))
    return model


def trainable_line(n_train: int, n_total: int) -> str:
    """The seed's line: `Trainable: 26,882 / 22,713,986 (0.118%)`."""
    return f"Trainable: {n_train:,} / {n_total:,} ({100.0 * n_train / max(n_total, 1):.3f}%)"


def count_trainable(*modules: nn.Module) -> tuple[int, int, float]:
    """(trainable, total, share in %) over the distinct parameters of `modules`.

    A parameter with a `bitfit_mask` (part of a tensor trains, see `bitfit.methods`) counts its True entries."""
    params = {id(p): p for m in modules for p in m.parameters()}.values()
    n_total = sum(p.numel() for p in params)
    n_train = 0
    for p in params:
        if p.requires_grad:
            mask = getattr(p, "bitfit_mask", None)
            n_train += int(mask.sum()) if mask is not None else p.numel()
    return n_train, n_total, 100.0 * n_train / max(n_total, 1)
