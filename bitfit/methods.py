"""Training methods behind one seam: each says what trains and at which default learning rate.

A method's `prepare(model, backbone, seed)` marks the trainable parameters of a TaskModel (and may
wrap its backbone, as LoRA does). It may return a step hook, which the training loop calls after every
optimizer step. `servable` methods change only biases and the head, so their result is a BiasSet the
server can load; the others are for comparison (`bitfit compare`).

Methods that train only part of a tensor (`random`, and `bq-bm2` on fused projections) mark it with a
boolean `bitfit_mask` attribute on the parameter: the gradient of every other entry is zeroed, and
the step hook writes the frozen entries back, because AdamW's decoupled weight decay shrinks every
entry of a tensor whatever its gradient. `trainable_scalars` counts through those masks.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from bitfit.backbone import Backbone
from bitfit.errors import BitfitError
from bitfit.heads import TaskModel
from bitfit.inject import adopt_state, apply_bitfit
from bitfit.layout import HFConv1D

StepHook = Callable[[], None]


@dataclass(frozen=True)
class Method:
    name: str
    lr: float  # default peak learning rate for AdamW
    servable: bool  # the result is a bias set (only biases and the head moved)
    prepare: Callable[[TaskModel, Backbone, int], StepHook | None]
    help: str
    grid: tuple[float, ...] = ()  # learning-rate candidates of `bitfit compare` (presets may replace them)


def _freeze_all(model: TaskModel) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def _train_head(model: TaskModel) -> None:
    for p in model.head.parameters():
        p.requires_grad_(True)


def prepare_bitfit(model: TaskModel, backbone: Backbone, seed: int) -> None:
    # load_backbone injected and fingerprinted the backbone: hand that record over (no second hash, and the
    # pre-trained biases even after --init moved them); train.py prints its own trainable line
    adopt_state(model.backbone, backbone.layout, backbone.original, backbone.injected)
    apply_bitfit(model.backbone, model.head, inject=False, verbose=False)


def prepare_head(model: TaskModel, backbone: Backbone, seed: int) -> None:
    _freeze_all(model)
    _train_head(model)


def prepare_full(model: TaskModel, backbone: Backbone, seed: int) -> None:
    for p in model.parameters():
        p.requires_grad_(True)


# ---------------------------------------------------------------------------------------------
# Partly trainable tensors


def mask_parameter(p: nn.Parameter, mask: torch.Tensor) -> None:
    """Train only the entries of `p` where `mask` (bool, p's shape) is True."""
    p.requires_grad_(True)
    p.bitfit_mask = mask
    p.bitfit_frozen = p.detach().clone()  # what the untrained entries must stay, bit for bit
    p.register_hook(lambda g: torch.where(mask, g, torch.zeros((), dtype=g.dtype)))


def restore_masked(model: nn.Module) -> StepHook:
    """A step hook that writes back the frozen entries of every masked parameter of `model`."""
    masked = [p for p in model.parameters() if getattr(p, "bitfit_mask", None) is not None]

    @torch.no_grad()
    def hook() -> None:
        for p in masked:
            p.copy_(torch.where(p.bitfit_mask, p, p.bitfit_frozen))

    return hook


def trainable_scalars(model: nn.Module) -> int:
    """Scalars the optimizer may move: whole trainable tensors, and the True entries of masked ones."""
    n = 0
    for p in model.parameters():
        if not p.requires_grad:
            continue
        mask = getattr(p, "bitfit_mask", None)
        n += int(mask.sum()) if mask is not None else p.numel()
    return n


def prepare_random(model: TaskModel, backbone: Backbone, seed: int) -> StepHook:
    """As many backbone scalars as BitFit trains (its bias count), drawn uniformly among all of them."""
    _freeze_all(model)
    params = list(model.backbone.parameters())
    sizes = torch.tensor([p.numel() for p in params])
    k = backbone.layout.size
    # sample(range(N), k) draws k distinct indices in O(k), never materialising a permutation of N
    chosen = torch.tensor(sorted(random.Random(seed).sample(range(int(sizes.sum())), k)), dtype=torch.long)
    starts = torch.cumsum(sizes, 0) - sizes
    owner = torch.searchsorted(torch.cumsum(sizes, 0), chosen, right=True)  # which tensor each index falls in
    for i, p in enumerate(params):
        local = chosen[owner == i] - starts[i]
        if local.numel() == 0:
            continue
        mask = torch.zeros(p.numel(), dtype=torch.bool, device=p.device)
        mask[local.to(p.device)] = True
        mask_parameter(p, mask.view_as(p))
    _train_head(model)
    return restore_masked(model)


# ---------------------------------------------------------------------------------------------
# bq-bm2: the paper's subset, query biases and the first MLP layer's biases


# Last module names of the query projection, and of the MLP's first (expanding) layer, per family:
# BERT/RoBERTa/ELECTRA, DistilBERT, Llama/Mistral/Qwen, T5, GPT-2, OPT, GPT-NeoX.
QUERY_NAMES = {"query", "q_lin", "q_proj", "q"}
FUSED_QKV_NAMES = {"c_attn"}  # GPT-2: [q | k | v] along the output, so the query is the first third
INTERMEDIATE_NAMES = {"lin1", "c_fc", "wi", "wi_0", "wi_1", "up_proj", "gate_proj", "fc1", "dense_h_to_4h"}
INTERMEDIATE_PATHS = ("intermediate.dense",)  # BERT names it by its parent
PROJECTION_KINDS = {"linear", "conv1d", "injected"}


def bq_bm2_slots(backbone: Backbone) -> list[tuple[str, str]]:
    """(slot path, role) for the query and MLP-intermediate bias slots; role: query | fused_qkv | intermediate.

    Found among the layout's slots of projection kind, so a layer norm or a mask buffer never matches.
    Raises BitfitError when either role is missing: a model family whose names we do not know.
    """
    found = []
    for slot in backbone.layout.slots:
        if slot.kind not in PROJECTION_KINDS:
            continue
        name = slot.path.rsplit(".", 1)[-1]
        if name in QUERY_NAMES:
            found.append((slot.path, "query"))
        elif name in FUSED_QKV_NAMES:
            found.append((slot.path, "fused_qkv"))
        elif name in INTERMEDIATE_NAMES or slot.path.endswith(INTERMEDIATE_PATHS):
            found.append((slot.path, "intermediate"))
    queries = [p for p, r in found if r != "intermediate"]
    mlps = [p for p, r in found if r == "intermediate"]
    if not queries or not mlps:
        names = sorted({s.path.rsplit(".", 1)[-1] for s in backbone.layout.slots if s.kind in PROJECTION_KINDS})
        raise BitfitError(
            f"bq-bm2 found {len(queries)} query and {len(mlps)} MLP-intermediate bias slots; it knows query names "
            f"{sorted(QUERY_NAMES | FUSED_QKV_NAMES)} and intermediate names {sorted(INTERMEDIATE_NAMES)} or "
            f"'*.intermediate.dense', and this model's projections are named {names}"
        )
    return found


def prepare_bq_bm2(model: TaskModel, backbone: Backbone, seed: int) -> StepHook | None:
    _freeze_all(model)
    for path, role in bq_bm2_slots(backbone):
        bias = model.backbone.get_submodule(path).bias
        if role == "fused_qkv":
            if bias.numel() % 3:
                raise BitfitError(f"{path}: a fused q/k/v bias of {bias.numel()} values does not split in three")
            mask = torch.zeros_like(bias, dtype=torch.bool)
            mask[: bias.numel() // 3] = True
            mask_parameter(bias, mask)
        else:
            bias.requires_grad_(True)
    _train_head(model)
    return restore_masked(model) if any(hasattr(p, "bitfit_mask") for p in model.parameters()) else None


# ---------------------------------------------------------------------------------------------
# LoRA (PEFT): rank 8 on the query and value projections, the head trained


LORA_RANK, LORA_ALPHA, LORA_DROPOUT = 8, 16, 0.1
LORA_TARGETS = ({"query", "value"}, {"q_lin", "v_lin"}, {"q_proj", "v_proj"}, {"q", "v"}, {"c_attn"})


def lora_targets(model: nn.Module) -> list[str]:
    """The first family of query/value projection names that this model's linear layers carry in full."""
    linear = (nn.Linear, HFConv1D) if HFConv1D else (nn.Linear,)
    names = {path.rsplit(".", 1)[-1] for path, m in model.named_modules() if isinstance(m, linear)}
    for targets in LORA_TARGETS:
        if targets <= names:
            return sorted(targets)
    raise BitfitError(f"lora: no query/value projections among this model's linear layers {sorted(names)}")


def prepare_lora(model: TaskModel, backbone: Backbone, seed: int) -> None:
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT,
                        target_modules=lora_targets(model.backbone), bias="none")
    inject_adapter_in_model(config, model.backbone)  # in place: the query/value layers now wrap a frozen base
    _freeze_all(model)
    # by the layer type, not by "lora_" in parameter names
    for module in model.backbone.modules():
        if isinstance(module, LoraLayer):
            for p in list(module.lora_A.parameters()) + list(module.lora_B.parameters()):
                p.requires_grad_(True)
    _train_head(model)


# ---------------------------------------------------------------------------------------------
# (IA)^3 (PEFT): learned vectors scaling the keys, the values and the MLP's inner activations


# per family: (key and value projection names, the MLP's down projection, whose *input* is scaled)
IA3_FAMILIES = (({"key", "value"}, "output.dense"), ({"k_lin", "v_lin"}, "lin2"), ({"k_proj", "v_proj"}, "down_proj"),
                ({"k", "v"}, "wo"))


def ia3_targets(model: nn.Module) -> tuple[list[str], list[str]]:
    """(target module paths, of which feedforward) for PEFT's IA3Config, as full paths.

    Full paths, because PEFT's BERT default ("output.dense" as a suffix) also catches `attention.output.dense`,
    the attention's output projection, which the (IA)^3 paper does not rescale.
    """
    linear = (nn.Linear, HFConv1D) if HFConv1D else (nn.Linear,)
    paths = [path for path, m in model.named_modules() if isinstance(m, linear)]
    for kv, down in IA3_FAMILIES:
        keys_values = [p for p in paths if p.rsplit(".", 1)[-1] in kv]
        mlp = [p for p in paths if (p == down or p.endswith("." + down)) and ".attention." not in f".{p}"]
        if {p.rsplit(".", 1)[-1] for p in keys_values} == kv and mlp:
            return sorted(keys_values + mlp), sorted(mlp)
    names = sorted({p.rsplit(".", 1)[-1] for p in paths})
    raise BitfitError(f"ia3: no key/value projections and MLP down projection among this model's linear layers {names}")


def prepare_ia3(model: TaskModel, backbone: Backbone, seed: int) -> None:
    from peft import IA3Config, inject_adapter_in_model
    from peft.tuners.ia3 import IA3Layer

    targets, feedforward = ia3_targets(model.backbone)
    inject_adapter_in_model(IA3Config(target_modules=targets, feedforward_modules=feedforward), model.backbone)
    _freeze_all(model)
    for module in model.backbone.modules():  # by the layer type, as for LoRA
        if isinstance(module, IA3Layer):
            for p in module.ia3_l.parameters():
                p.requires_grad_(True)
    _train_head(model)


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


register(Method("bitfit", 2e-3, True, prepare_bitfit, "bias terms and the head (BitFit)", (1e-3, 2e-3, 5e-3)))
register(Method("head", 2e-3, True, prepare_head, "the head only, backbone frozen", (2e-3, 1e-2)))
register(Method("full", 5e-5, False, prepare_full, "every weight (full fine-tuning)", (2e-5, 5e-5, 1e-4)))
register(Method("lora", 5e-4, False, prepare_lora,
                f"LoRA rank {LORA_RANK} (alpha {LORA_ALPHA}) on query and value, and the head (PEFT)", (2e-4, 5e-4, 1e-3)))
register(Method("random", 2e-3, False, prepare_random,
                "as many backbone scalars as BitFit, drawn uniformly at random (gradient mask), and the head",
                (1e-3, 2e-3, 5e-3)))
register(Method("ia3", 3e-3, False, prepare_ia3,
                "(IA)^3: vectors scaling keys, values and the MLP's inner activations, and the head (PEFT)",
                (1e-3, 3e-3, 1e-2)))
register(Method("bq-bm2", 2e-3, True, prepare_bq_bm2,
                "only the query and MLP-intermediate biases (the paper's bq+bm2 subset), and the head", (1e-3, 2e-3, 5e-3)))


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}") from None
