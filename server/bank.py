"""The bias bank: resident tasks on the device, one row of absolute biases per task version, plus its head.

A key is whatever the caller uses to name a task version (the server uses `(task, version)`); the
engine only ever sees row numbers. Rows are reused after an eviction, and the table grows by 1/8 (at least
8 rows), or to an exact size with `reserve`, which reallocates the bank but never the backbone. (Doubling
would leave up to half the table unused; BENCHMARKS.md, memory per task.) Everything is checked and built
before the bank is touched, so a bad bias set costs nothing already resident (load before evict). Load and evict are
idempotent. The bank is not thread-safe: one thread (the batcher's worker) owns it.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Hashable
from dataclasses import dataclass

import torch

from bitfit.bias_set import BiasSet
from bitfit.errors import BiasSetFormatError
from bitfit.heads import POOLINGS
from bitfit.layout import BiasLayout


@dataclass(frozen=True)
class Head:
    weight: torch.Tensor  # (n_out, hidden) float32 on the device
    bias: torch.Tensor  # (n_out,) float32 on the device
    pooling: str  # mean | cls | pooler | last
    labels: tuple[str, ...]  # () for a regression task

    @property
    def num_outputs(self) -> int:
        return self.weight.shape[0]


def head_problems(bias_set: BiasSet, hidden: int, has_pooler: bool) -> list[str]:
    """Everything wrong with a bias set's head for this backbone; empty when it fits."""
    problems = []
    w, b = bias_set.head.get("out.weight"), bias_set.head.get("out.bias")
    n = bias_set.num_outputs
    if w is None or b is None:
        problems.append("head lacks 'out.weight' or 'out.bias'")
    else:
        if tuple(w.shape) != (n, hidden):
            problems.append(f"head weight has shape {tuple(w.shape)}, expected ({n}, {hidden}) for {n} outputs")
        if tuple(b.shape) != (n,):
            problems.append(f"head bias has shape {tuple(b.shape)}, expected ({n},)")
    if bias_set.pooling not in POOLINGS:
        problems.append(f"pooling {bias_set.pooling!r} is not one of {POOLINGS}")
    elif bias_set.pooling == "pooler" and not has_pooler:
        problems.append("pooling 'pooler' needs a backbone with a pre-trained pooler, and this one has none")
    return problems


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def pin_mmap_threshold(nbytes: int = 65536) -> bool:
    """Fix glibc's mmap threshold, so that reallocated bank tables go back to the OS (call once per process).

    glibc raises the threshold every time a large block is freed, after which big tables come from the heap and
    the old ones stay there: 2.1x the raw bytes per task at 10,000 tasks instead of 1.1x (BENCHMARKS.md).
    An explicit MALLOC_MMAP_THRESHOLD_ wins; returns whether the threshold is now fixed.
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return True
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, nbytes))
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to pin
        return False


class BiasBank:
    def __init__(
        self,
        layout: BiasLayout,
        original: torch.Tensor,  # (N,) float32, the pre-trained biases in layout order
        hidden: int,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        has_pooler: bool = True,
        capacity: int = 8,
    ):
        self.layout, self.hidden, self.has_pooler = layout, hidden, has_pooler
        self.device, self.dtype = torch.device(device), dtype
        self.original = original.to(torch.float32).cpu()
        self.rows = torch.zeros(max(capacity, 1), layout.size, device=self.device, dtype=dtype)  # (capacity, N)
        self.heads: dict[int, Head] = {}  # row -> head
        self._index: dict[Hashable, int] = {}  # key -> row
        self._free = list(range(self.rows.shape[0] - 1, -1, -1))  # pop() hands out the lowest row first
        self.generation = 0  # changes whenever the content of some row changes

    def __contains__(self, key: Hashable) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def keys(self) -> list[Hashable]:
        return list(self._index)

    def row(self, key: Hashable) -> int:
        """The bank row of a resident key; KeyError if it is not resident."""
        return self._index[key]

    @property
    def nbytes(self) -> int:
        """Bytes held on the device: the whole row table plus the heads."""
        heads = sum(h.weight.nbytes + h.bias.nbytes for h in self.heads.values())
        return self.rows.nbytes + heads

    def load(self, key: Hashable, bias_set: BiasSet) -> bool:
        """Make `key` resident with this bias set. Returns False (and changes nothing) if it already was."""
        if key in self._index:
            return False
        # 1) check and build everything off to the side: a bad set leaves the bank as it was
        bias_set.check_backbone(self.layout)
        problems = head_problems(bias_set, self.hidden, self.has_pooler)
        if problems:
            raise BiasSetFormatError(f"bias set for task {bias_set.task!r}: " + "; ".join(problems))
        absolute = bias_set.absolute_biases(self.original)  # (N,) float32, exact sum before any cast
        head = Head(
            weight=bias_set.head["out.weight"].to(self.device, torch.float32).contiguous(),
            bias=bias_set.head["out.bias"].to(self.device, torch.float32).contiguous(),
            pooling=bias_set.pooling,
            labels=tuple(bias_set.labels),
        )
        # 2) only then claim a row
        if not self._free:
            self._grow()
        row = self._free.pop()
        self.rows[row].copy_(absolute.to(self.dtype))
        self.heads[row] = head
        self._index[key] = row
        self.generation += 1
        return True

    def evict(self, key: Hashable) -> bool:
        """Drop `key` from the bank. Returns False if it was not resident."""
        row = self._index.pop(key, None)
        if row is None:
            return False
        del self.heads[row]
        self._free.append(row)
        self.generation += 1
        return True

    @property
    def capacity(self) -> int:
        return self.rows.shape[0]

    def reserve(self, rows: int) -> None:
        """Make room for `rows` resident versions in one reallocation (no-op if there is room already)."""
        if rows > self.capacity:
            self._grow(rows)

    def _grow(self, capacity: int | None = None) -> None:
        old = self.rows
        n = old.shape[0]
        self.rows = torch.zeros(capacity or n + max(8, n // 8), old.shape[1], device=self.device, dtype=self.dtype)
        self.rows[:n].copy_(old)
        self._free = list(range(self.rows.shape[0] - 1, n - 1, -1)) + self._free  # new rows after the freed ones
