"""The bias bank: resident tasks on the device, one row of absolute biases per task version, and one head table.

A key is whatever the caller uses to name a task version (the runner uses `(task, version)`); the engine only
ever sees row numbers. Rows are reused after an eviction, and the table grows by 1/8 (at least 8 rows), or to an
exact size with `reserve`, which reallocates the bank but never the backbone. (Doubling would leave up to half the
table unused; docs/benchmarks.md, memory per task.)

Heads live in one table too: every output row of every resident head is a row of `head_weight` (R, hidden), and a
task's head is a run of `count` rows starting at `offset`. A batch's heads are then one gather of (batch, widest
head in the batch, hidden) and one batched product, whatever the number of tasks in it. Runs are reused by heads
of the same width, so the table stays near the sum of the resident heads.

Everything is checked (the serving spec's one check, the same the store ran on upload) and built before the bank is
touched, so a bad bias set costs nothing already resident (load before evict). Load and evict are idempotent.
The bank is not thread-safe: one thread (the runner's worker) owns it.
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

from bitfit.bias_set import BiasSet
from bitfit.errors import BiasSetFormatError
from bitfit.heads import POOLINGS
from bitfit.spec import ServingSpec


@dataclass(frozen=True)
class RowInfo:
    """What the rest of the server needs to know about a resident task version, readable from any thread."""

    labels: tuple[str, ...]  # () for a regression task
    pooling: str  # mean | cls | pooler | last
    input_kind: str | None  # "text" | "pair"; None: not recorded, any kind is served
    offset: int  # first row of its head in the head table
    count: int  # head outputs (1 for regression); 0 for a generation set (the backbone's LM head writes)
    kind: str = "classification"  # or "generation"
    prompt_template: str | None = None  # generation: the prompt, "{input}" where the task input goes
    stop: tuple[str, ...] = ()  # generation: the text ends before the first of these

    @property
    def generates(self) -> bool:
        return self.kind == "generation"

    @cached_property
    def run(self) -> tuple[int, ...]:  # its head's rows in the head table
        return tuple(range(self.offset, self.offset + self.count))


def grow(n: int) -> int:
    return n + max(8, n // 8)


def table(*shape: int, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A zeroed table for the bank. On the CPU each table is its own anonymous memory mapping, so that a table the
    bank has outgrown goes back to the OS the moment it is freed, whatever glibc does with its heap.

    From the heap, freed tables stay: glibc raises its mmap threshold each time a large block is freed, after
    which big tables come from the heap, 2.1x the raw bytes per task at 10,000 tasks instead of 1.1x
    (docs/benchmarks.md). Fixing the threshold low instead (mallopt, as before) mapped every large block of the
    process, the activations of each forward included, and faulted them in page by page: 28 % more CPU per input
    over HTTP (bench/runtime.py). A mapping is zero-filled and its pages are only resident once written.
    """
    if device.type != "cpu" or math.prod(shape) == 0:
        return torch.zeros(*shape, device=device, dtype=dtype)
    size = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    return torch.frombuffer(mmap.mmap(-1, size), dtype=dtype).view(*shape)


class BiasBank:
    def __init__(
        self,
        spec: ServingSpec,
        original: torch.Tensor,  # (N,) float32, the pre-trained biases in layout order
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        capacity: int = 8,
    ):
        if original.numel() != spec.layout_size:
            raise ValueError(f"original biases have {original.numel()} values, the spec says {spec.layout_size}")
        self.spec, self.device, self.dtype = spec, torch.device(device), dtype
        self.original = original.to(torch.float32).cpu()
        self.rows = table(max(capacity, 1), spec.layout_size, device=self.device, dtype=dtype)  # (capacity, N)
        self.head_weight = table(16, spec.hidden, device=self.device)  # (R, hidden) float32
        self.head_bias = table(16, device=self.device)  # (R,)
        self.info: dict[int, RowInfo] = {}  # row -> what it holds
        self._index: dict[Hashable, int] = {}  # key -> row
        self._free = list(range(self.rows.shape[0] - 1, -1, -1))  # pop() hands out the lowest row first
        self._head_end = 0  # head rows in use up to here; freed runs wait in _free_heads by width
        self._free_heads: dict[int, list[int]] = {}
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
    def capacity(self) -> int:
        return self.rows.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes held on the device: the row table and the head table."""
        return self.rows.nbytes + self.head_weight.nbytes + self.head_bias.nbytes

    # -- changes ---------------------------------------------------------------------------------------

    def load(self, key: Hashable, bias_set: BiasSet) -> bool:
        """Make `key` resident with this bias set. Returns False (and changes nothing) if it already was."""
        if key in self._index:
            return False
        # 1) check and build everything off to the side: a bad set leaves the bank as it was
        problems = self.spec.check(bias_set)
        if problems:
            raise BiasSetFormatError(f"bias set for task {bias_set.task!r}: " + "; ".join(problems))
        absolute = bias_set.absolute_biases(self.original)  # (N,) float32, exact sum before any cast
        if bias_set.is_generation:  # no head: no head rows
            weight = torch.zeros(0, self.spec.hidden, device=self.device)
            bias = torch.zeros(0, device=self.device)
        else:
            weight = bias_set.head["out.weight"].to(self.device, torch.float32)  # (n_out, hidden)
            bias = bias_set.head["out.bias"].to(self.device, torch.float32)  # (n_out,)
        # 2) only then claim a row and a run of head rows
        if not self._free:
            self._grow(grow(self.capacity))
        row, count = self._free.pop(), weight.shape[0]
        offset = self._claim_heads(count)
        self.rows[row].copy_(absolute.to(self.dtype))
        self.head_weight[offset : offset + count].copy_(weight)
        self.head_bias[offset : offset + count].copy_(bias)
        self.info[row] = RowInfo(tuple(bias_set.labels), bias_set.pooling, bias_set.input_kind, offset, count,
                                 bias_set.kind, bias_set.prompt_template, tuple(bias_set.stop))
        self._index[key] = row
        self.generation += 1
        return True

    def evict(self, key: Hashable) -> bool:
        """Drop `key` from the bank. Returns False if it was not resident."""
        row = self._index.pop(key, None)
        if row is None:
            return False
        info = self.info.pop(row)
        self._free_heads.setdefault(info.count, []).append(info.offset)
        self._free.append(row)
        self.generation += 1
        return True

    def reserve(self, rows: int) -> None:
        """Make room for `rows` resident versions in one reallocation (no-op if there is room already)."""
        if rows > self.capacity:
            self._grow(rows)

    def _grow(self, capacity: int) -> None:
        old = self.rows
        n = old.shape[0]
        self.rows = table(capacity, old.shape[1], device=self.device, dtype=self.dtype)
        self.rows[:n].copy_(old)
        self._free = list(range(capacity - 1, n - 1, -1)) + self._free  # new rows after the freed ones

    def _claim_heads(self, count: int) -> int:
        runs = self._free_heads.get(count)
        if runs:
            return runs.pop()
        offset, end = self._head_end, self._head_end + count
        if end > self.head_weight.shape[0]:
            size = max(grow(self.head_weight.shape[0]), end)
            weight = table(size, self.spec.hidden, device=self.device)
            bias = table(size, device=self.device)
            weight[:offset].copy_(self.head_weight[:offset])
            bias[:offset].copy_(self.head_bias[:offset])
            self.head_weight, self.head_bias = weight, bias
        self._head_end = end
        return offset

    # -- per batch -------------------------------------------------------------------------------------

    def head_index(self, rows: Sequence[int]) -> tuple[torch.Tensor, list[int]]:
        """Head-table rows per input, padded to the widest head in the batch, and each input's width.

        Returns idx (b, m) on the device (a padded position repeats the head's last row) and the widths. Built on
        the host from the bank's own bookkeeping, one step per input whatever the number of tasks: no device sync.
        """
        infos = [self.info[r] for r in rows]
        widths = [i.count for i in infos]
        m = max(widths)
        idx = [i.run if i.count == m else i.run + (i.run[-1],) * (m - i.count) for i in infos]
        return torch.tensor(idx, dtype=torch.long).to(self.device, non_blocking=True), widths

    def poolings(self, rows: Sequence[int]) -> tuple[list[str], list[int]]:
        """The poolings a batch needs (in POOLINGS order) and, per input, the index of its own in that list."""
        per_row = [self.info[r].pooling for r in rows]
        used = sorted(set(per_row), key=POOLINGS.index)
        if len(used) == 1:
            return used, [0] * len(per_row)
        where = {p: i for i, p in enumerate(used)}
        return used, [where[p] for p in per_row]
