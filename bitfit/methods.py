"""Training methods behind one seam: each says what trains and at which default learning rate.

A method's `prepare(model, backbone, seed)` marks the trainable parameters of a TaskModel (and may
wrap its backbone, as LoRA does). `servable` methods change only biases and the head, so their result
is a BiasSet the server can load; the others are for comparison.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bitfit.backbone import Backbone
from bitfit.heads import TaskModel
from bitfit.inject import apply_bitfit


@dataclass(frozen=True)
class Method:
    name: str
    lr: float  # default peak learning rate for AdamW
    servable: bool  # the result is a bias set (only biases and the head moved)
    prepare: Callable[[TaskModel, Backbone, int], None]
    help: str


def _freeze_all(model: TaskModel) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def prepare_bitfit(model: TaskModel, backbone: Backbone, seed: int) -> None:
    apply_bitfit(model.backbone, model.head)


def prepare_head(model: TaskModel, backbone: Backbone, seed: int) -> None:
    _freeze_all(model)
    for p in model.head.parameters():
        p.requires_grad_(True)


def prepare_full(model: TaskModel, backbone: Backbone, seed: int) -> None:
    for p in model.parameters():
        p.requires_grad_(True)


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


register(Method("bitfit", 2e-3, True, prepare_bitfit, "bias terms and the head (BitFit)"))
register(Method("head", 2e-3, True, prepare_head, "the head only, backbone frozen"))
register(Method("full", 5e-5, False, prepare_full, "every weight (full fine-tuning)"))


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}") from None
