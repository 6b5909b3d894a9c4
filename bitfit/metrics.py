"""GLUE metrics, in plain torch: accuracy, F1, Matthews correlation, Pearson and Spearman."""

from __future__ import annotations

import math

import torch


def accuracy(pred: torch.Tensor, gold: torch.Tensor) -> float:
    return (pred == gold).float().mean().item()


def f1(pred: torch.Tensor, gold: torch.Tensor, positive: int = 1) -> float:
    tp = ((pred == positive) & (gold == positive)).sum().item()
    fp = ((pred == positive) & (gold != positive)).sum().item()
    fn = ((pred != positive) & (gold == positive)).sum().item()
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def matthews(pred: torch.Tensor, gold: torch.Tensor) -> float:
    tp = ((pred == 1) & (gold == 1)).sum().item()
    tn = ((pred == 0) & (gold == 0)).sum().item()
    fp = ((pred == 1) & (gold == 0)).sum().item()
    fn = ((pred == 0) & (gold == 1)).sum().item()
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return 0.0 if denom == 0 else (tp * tn - fp * fn) / denom


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denom = (x.norm() * y.norm()).item()
    return 0.0 if denom == 0 else (x @ y).item() / denom


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Average ranks, ties sharing the mean of their positions (as scipy.stats.rankdata)."""
    x = x.double()
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(1, len(x) + 1, dtype=torch.float64)
    values, inverse = torch.unique(x, return_inverse=True)
    sums = torch.zeros(len(values), dtype=torch.float64).index_add_(0, inverse, ranks)
    counts = torch.zeros(len(values), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(ranks))
    return (sums / counts)[inverse]


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    return pearson(_ranks(x), _ranks(y))


def glue_metrics(outputs: torch.Tensor, gold: torch.Tensor, regression: bool) -> dict[str, float]:
    """Every metric that applies: outputs (n, k) logits, or (n, 1) scores for regression."""
    if regression:
        scores = outputs.reshape(-1).float()
        return {"pearson": pearson(scores, gold), "spearman": spearman(scores, gold)}
    pred = outputs.argmax(-1)
    gold = gold.long()
    out = {"accuracy": accuracy(pred, gold)}
    if outputs.shape[-1] == 2:
        out["f1"] = f1(pred, gold)
        out["matthews"] = matthews(pred, gold)
    return out
