"""Running a task model over examples and scoring it; rebuilding a task model from a bias set."""

from __future__ import annotations

import torch
from tqdm import tqdm

from bitfit.backbone import Backbone
from bitfit.bias_set import BiasSet
from bitfit.data import Example, TaskSpec
from bitfit.heads import TaskHead, TaskModel
from bitfit.metrics import glue_metrics


def batches_by_length(examples: list[Example], batch_size: int) -> list[list[int]]:
    """Index batches of similar length: less padding, same results (outputs are put back in order)."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].text) + len(examples[i].pair or ""))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def encode_examples(backbone: Backbone, examples: list[Example]) -> dict[str, torch.Tensor]:
    texts = [e.text for e in examples]
    pairs = [e.pair for e in examples] if examples and examples[0].pair is not None else None
    return dict(backbone.encode(texts, pairs))


@torch.no_grad()
def predict(model: TaskModel, backbone: Backbone, examples: list[Example], batch_size: int = 128, progress: bool = False):
    """Outputs (n, k) in the order of `examples`."""
    was_training = model.training
    model.eval()
    outputs: list[torch.Tensor | None] = [None] * len(examples)
    device = next(model.parameters()).device
    for idx in tqdm(batches_by_length(examples, batch_size), desc="eval", disable=not progress, leave=False):
        inputs = encode_examples(backbone, [examples[i] for i in idx])
        out = model(**{k: v.to(device) for k, v in inputs.items()}).cpu()
        for i, row in zip(idx, out):
            outputs[i] = row
    model.train(was_training)
    return torch.stack(outputs) if outputs else torch.zeros(0, 1)


def evaluate(model: TaskModel, backbone: Backbone, spec: TaskSpec, examples: list[Example], **kw) -> dict[str, float]:
    outputs = predict(model, backbone, examples, **kw)
    gold = torch.tensor([e.label for e in examples], dtype=torch.float64 if spec.is_regression else torch.long)
    return glue_metrics(outputs, gold, spec.is_regression)


def task_model_from_bias_set(backbone: Backbone, bias_set: BiasSet) -> TaskModel:
    """The backbone with the task's biases written in place, and its head. Checks the fingerprint first."""
    bias_set.check_backbone(backbone.layout)
    backbone.layout.scatter(backbone.model, bias_set.absolute_biases(backbone.original))
    head = TaskHead.from_tensors(bias_set.head, bias_set.pooling)
    return TaskModel(backbone.model, head).eval()


def primary(metrics: dict[str, float], spec: TaskSpec) -> float:
    return metrics[spec.metric]


def format_metrics(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
