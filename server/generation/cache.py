"""The running batch's KV cache as rows that join and leave (a transformers `DynamicCache`, left-padded).

Every row's keys and values sit at the right end of the cache, with masked (zero) padding on its left; a row's
keys carry its own rotary positions, so where a column sits never changes what the row computes. Three edits:

- `join(a, mask_a, b, mask_b)`: left-pad the shorter cache (and mask) to the longer one's length, concatenate rows;
- `select(cache, mask, rows)`: keep these rows, in this order (finished and cancelled sequences leave);
- `trim(cache, mask)`: drop leading columns that every row masks (after long rows left).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _layers(cache):
    return [layer for layer in cache.layers if layer.is_initialized]


def length(cache) -> int:
    return cache.get_seq_length()


def _pad_left(x: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    if n == 0:
        return x
    pad = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [n, 0]  # F.pad counts from the last dimension
    return F.pad(x, pad)


def join(a, mask_a: torch.Tensor, b, mask_b: torch.Tensor) -> tuple[object, torch.Tensor]:
    """Rows of `b` appended to `a` (a is changed in place and returned), and the joined mask (rows, columns)."""
    la, lb = mask_a.shape[1], mask_b.shape[1]
    width = max(la, lb)
    for x, y in zip(_layers(a), _layers(b)):  # keys, values: (rows, kv heads, columns, head dim)
        x.keys = torch.cat([_pad_left(x.keys, width - la, 2), _pad_left(y.keys, width - lb, 2)])
        x.values = torch.cat([_pad_left(x.values, width - la, 2), _pad_left(y.values, width - lb, 2)])
    mask = torch.cat([_pad_left(mask_a, width - la, 1), _pad_left(mask_b, width - lb, 1)])
    return a, mask


def select(cache, mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Keep `rows` (LongTensor) of the cache, in place, and return the mask's same rows."""
    for layer in _layers(cache):
        layer.keys = layer.keys.index_select(0, rows)
        layer.values = layer.values.index_select(0, rows)
    return mask.index_select(0, rows)


def trim(cache, mask: torch.Tensor) -> torch.Tensor:
    """Drop the leading columns no row attends to; returns the trimmed mask."""
    used = mask.any(0).nonzero()
    first = int(used[0]) if used.numel() else mask.shape[1]
    if first == 0:
        return mask
    for layer in _layers(cache):
        layer.keys = layer.keys[:, :, first:].contiguous()
        layer.values = layer.values[:, :, first:].contiguous()
    return mask[:, first:]
