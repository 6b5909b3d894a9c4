"""Bias sets from and into a `transformers` model that `apply_bitfit` prepared.

`bias_set_from_model` turns a trained model into the very BiasSet `bitfit train` writes: the delta of the
backbone's biases from the pre-trained ones `apply_bitfit` recorded, in layout order, the head's linear
layer, the pooling that head reads (`bitfit.hf_head`), and the backbone fingerprint recorded before
training. `load_bias_set_into` puts such a file back into a freshly loaded model. The backbone of a
`…ForSequenceClassification` is the `AutoModel` of the same directory, so a set saved here is served by a
server that loaded that directory (same class, same weights, same injected slots, same fingerprint).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn

from bitfit.bias_set import INPUT_KINDS, BiasSet, load_bias_set
from bitfit.errors import BitfitError
from bitfit.hf_head import LinearHead, linear_head
from bitfit.inject import STATE, BitfitState, base_of, inject_at, on_meta, record_state, remove_injected
from bitfit.layout import find_slots, fingerprint, layout_of


def state_of(model: nn.Module) -> BitfitState:
    state = getattr(base_of(model), STATE, None)
    if state is None:
        raise BitfitError("this model was not prepared with apply_bitfit(model) (or load_bias_set_into): that call "
                          "records the pre-trained biases and the backbone fingerprint a bias set is made of")
    if state.layout is None:
        raise BitfitError("the model is on the meta device (no weights): it can be counted, not saved")
    return state


def labels_for(model: nn.Module, labels: Sequence[str] | None, n_out: int) -> list[str]:
    """The class names in output order; [] for a regression head (one output, as `num_labels=1` means in HF)."""
    if labels is None:
        if n_out == 1:
            return []
        id2label = getattr(getattr(model, "config", None), "id2label", None) or {}
        return [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(n_out)]
    labels = list(labels)
    if not all(isinstance(x, str) and x for x in labels):
        raise BitfitError(f"labels must be non-empty strings, got {labels!r}")
    if len(set(labels)) != len(labels):
        raise BitfitError(f"labels {labels} repeat a name")
    if not labels and n_out != 1:
        raise BitfitError(f"labels=[] means regression (one output), but the head has {n_out} outputs")
    if labels and len(labels) != n_out:
        raise BitfitError(f"{len(labels)} labels {labels} for a head with {n_out} outputs"
                          + ("; a one-output head is a regression head: labels=[]" if n_out == 1 else ""))
    return labels


def backbone_unchanged(base: nn.Module, state: BitfitState) -> bool:
    """Whether everything but the biases is still what apply_bitfit fingerprinted (trained or cast?)."""
    layout = state.layout
    current = layout.gather(base)
    layout.scatter(base, state.original)
    try:
        return fingerprint(base, find_slots(base)) == layout.fingerprint
    finally:
        layout.scatter(base, current)


def bias_set_from_model(
    model: nn.Module,
    *,
    task: str,
    labels: Sequence[str] | None = None,
    input_kind: str | None = None,
    metrics: dict | None = None,
    method: str = "bitfit",
) -> BiasSet:
    """The BiasSet of a model `apply_bitfit` prepared and training moved; `labels` default to `config.id2label`."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a BiasSet or a torch model, got {type(model).__name__}")
    if not isinstance(task, str) or not task:
        raise BitfitError("task= must name the task (a non-empty string), e.g. task='sst2'")
    if input_kind is not None and input_kind not in INPUT_KINDS:
        raise BitfitError(f"input_kind {input_kind!r} is not one of {INPUT_KINDS}")
    state = state_of(model)
    base = base_of(model)
    if [s.path for s in find_slots(base)] != [s.path for s in state.slots]:
        raise BitfitError("the backbone's bias slots changed since apply_bitfit (biases added or removed)")
    head = linear_head(model)
    labels = labels_for(model, labels, head.num_outputs)
    if not backbone_unchanged(base, state):
        raise BitfitError("weights other than biases changed since apply_bitfit (trained, or cast to another "
                          "dtype), so no server's backbone would match; a bias set holds biases and the head only")
    weight = head.linear.weight.detach().to("cpu", torch.float32).clone()
    bias = head.linear.bias
    bias = bias.detach().to("cpu", torch.float32).clone() if bias is not None else torch.zeros(head.num_outputs)
    return BiasSet(
        task=task,
        delta=state.layout.gather(base) - state.original,
        head={"out.weight": weight, "out.bias": bias},
        labels=labels,
        fingerprint=state.layout.fingerprint,
        pooling=head.pooling,
        method=method,
        metrics=dict(metrics or {}),
        train_args={"source": "apply_bitfit", "model_class": type(model).__name__, "head": head.path,
                    "trained_slots": len(state.trained)},
        injected=list(state.injected),
        input_kind=input_kind,
    )


def load_bias_set_into(model: nn.Module, source: str | os.PathLike | BiasSet) -> nn.Module:
    """Write a bias set's biases (pre-trained + delta) and head into `model` and return it.

    `model` is a freshly loaded model of the set's backbone with a servable head of the set's shape, e.g.
    `AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)`. The set's injected slots are
    injected first. Every check runs before anything changes: a refused set leaves the model as it was.
    """
    bias_set = source if isinstance(source, BiasSet) else load_bias_set(source)
    if getattr(bias_set, "is_generation", False):
        raise BitfitError(f"bias set {bias_set.task!r} is a generation set (no head); load_bias_set_into needs a "
                          "classification or regression set")
    base = base_of(model)
    state = getattr(base, STATE, None)
    if (state is not None and state.layout is None) or (state is None and on_meta(base)):
        raise BitfitError("the model is on the meta device (no weights): load one with weights")
    added = [] if state is not None else inject_at(base, bias_set.injected)
    try:
        layout = state.layout if state is not None else layout_of(base)
        bias_set.check_backbone(layout)
        head = linear_head(model)
        problems = head_problems(head, bias_set)
        if problems:
            raise BitfitError(f"bias set {bias_set.task!r} does not fit this model's head: " + "; ".join(problems))
    except BitfitError:
        remove_injected(base, added)
        raise
    state = state or record_state(base, added, layout)
    state.layout.scatter(base, bias_set.absolute_biases(state.original))
    write_head(head, bias_set)
    if bias_set.labels and hasattr(model, "config"):
        model.config.id2label = dict(enumerate(bias_set.labels))
        model.config.label2id = {label: i for i, label in enumerate(bias_set.labels)}
    return model


def head_problems(head: LinearHead, bias_set: BiasSet) -> list[str]:
    problems = []
    if head.pooling != bias_set.pooling:
        problems.append(f"the set's head reads pooling {bias_set.pooling!r}, this model's {head.path} reads "
                        f"{head.pooling!r}")
    want = tuple(bias_set.head["out.weight"].shape) if "out.weight" in bias_set.head else None
    if want != tuple(head.linear.weight.shape):
        problems.append(f"the set's head weight has shape {list(want or [])}, this model's {head.path} "
                        f"{list(head.linear.weight.shape)} (outputs × hidden; num_labels={bias_set.num_outputs})")
    return problems


def write_head(head: LinearHead, bias_set: BiasSet) -> None:
    linear = head.linear
    bias = bias_set.head.get("out.bias")
    with torch.no_grad():
        linear.weight.copy_(bias_set.head["out.weight"].to(linear.weight.dtype))
        if bias is None:
            return
        if linear.bias is None:
            if not torch.count_nonzero(bias):
                return
            # a bitfit-train head has a bias that e.g. Llama's `score` lacks: add it, or outputs would differ
            linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype,
                                                   device=linear.weight.device), requires_grad=False)
        linear.bias.copy_(bias.to(linear.bias.dtype))
