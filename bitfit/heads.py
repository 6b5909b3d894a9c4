"""Task heads: pool token states into one vector per input, then a linear layer.

Pooling needs no weights of its own (mean, first token, last attended token), or reuses the
backbone's pre-trained pooler; a head never relies on a frozen random matrix.
"""

from __future__ import annotations

import torch
from torch import nn

POOLINGS = ("mean", "cls", "pooler", "last")


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str, pooler_output=None) -> torch.Tensor:
    """hidden (b, t, h), mask (b, t) -> (b, h)."""
    if pooling == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)  # (b, t, 1)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "pooler":
        if pooler_output is None:
            raise ValueError("pooling='pooler' needs a backbone with a pre-trained pooler")
        return pooler_output
    if pooling == "last":
        # position of the last attended token, whatever the padding side
        positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        last = (positions * mask.long()).argmax(dim=1)  # (b,)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")


class TaskHead(nn.Module):
    """Dropout and one linear layer on a pooled vector; `num_outputs` 1 means regression."""

    def __init__(self, hidden_size: int, num_outputs: int, pooling: str = "mean", dropout: float = 0.1):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_size, num_outputs)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor, pooler_output=None) -> torch.Tensor:
        return self.out(self.dropout(pool(hidden, mask, self.pooling, pooler_output)))  # (b, num_outputs)

    @staticmethod
    def from_tensors(tensors: dict[str, torch.Tensor], pooling: str) -> "TaskHead":
        """Rebuild a head from its saved tensors (`out.weight` (n, h), `out.bias` (n,))."""
        n, h = tensors["out.weight"].shape
        head = TaskHead(h, n, pooling)
        head.load_state_dict(tensors)
        return head.eval()


class TaskModel(nn.Module):
    """A backbone and a head: what training optimises and what `evaluate` runs."""

    def __init__(self, backbone: nn.Module, head: TaskHead):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        mask = batch["attention_mask"]
        out = self.backbone(**batch)
        pooler_output = getattr(out, "pooler_output", None)
        return self.head(out.last_hidden_state, mask, pooler_output)
