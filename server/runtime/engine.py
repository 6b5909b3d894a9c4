"""The torch engine: one resident, frozen backbone whose biases live in one flat buffer, and a bank of tasks.

A batch arrives as padded token tensors plus the bank row of each input; the engine never sees task names,
versions or HTTP. Three ways to run it, all equal to running each task alone:

- swap:   every row is one task -> copy that task's row into the flat buffer (one copy), plain forward;
- gather: several tasks -> every slot module's banked-bias wrapper (`layers.py`) adds its own slice of the
          bank for each row, so one forward serves them all, at the cost of one small gather per module;
- group:  several tasks -> one swap forward per task on its own rows (the runner picks it only when configured).
Heads run as one gather over the bank's head table, whatever the number of tasks in the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from bitfit.backbone import Backbone
from bitfit.heads import pool
from bitfit.spec import ServingSpec
from server.runtime.bank import BiasBank
from server.runtime.inputs import Encoded, Encoder, Item
from server.runtime.layers import BatchMapping, needs_zero_flat, wrap_slots

MODES = ("swap", "gather", "group")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class BatchOutput:
    logits: torch.Tensor  # (b, m) float32 on the CPU: each input's head outputs, padded to the widest head
    widths: list[int]  # outputs of each input's head (1 for regression)
    mode: str  # how the batch ran: swap | gather | group

    @property
    def outputs(self) -> list[torch.Tensor]:
        """Per input: its logits (n_labels,), or (1,) for a regression task."""
        return [self.logits[i, :w] for i, w in enumerate(self.widths)]


def flatten_biases(slots: list[tuple], flat: torch.Tensor) -> None:
    """Make each slot's bias parameter a view into `flat`, so a whole task is swapped by one copy."""
    for slot, module in slots:  # (BiasSlot, module) pairs
        view = flat[slot.offset : slot.offset + slot.size].view_as(module.bias)
        view.copy_(module.bias.detach())
        module.bias = nn.Parameter(view, requires_grad=False)
        # nn.Parameter keeps the storage it is given; check, since everything below relies on it
        assert module.bias.data_ptr() == view.data_ptr(), f"bias of {slot.path} is not a view into the flat buffer"


def choose_mode(n_tasks: int, group_max_tasks: int = 1) -> str:
    """One task: swap. Up to `group_max_tasks` tasks: one swap forward per task. More: gather, whose cost
    does not grow with the number of tasks."""
    if n_tasks <= 1:
        return "swap"
    return "group" if n_tasks <= group_max_tasks else "gather"


def batch_plan(bank: BiasBank, rows, mode: str | None) -> tuple[list[int], list[int], str]:
    """The batch's rows as a list, its distinct rows, and the mode to run it in; refuses rows that hold no task,
    an unknown mode and a swap of several tasks. Shared by every backend."""
    rows = rows.tolist() if isinstance(rows, torch.Tensor) else list(rows)
    unique = sorted(set(rows))
    for r in unique:
        if r not in bank.info:
            raise KeyError(f"bank row {r} holds no task")
    mode = mode or choose_mode(len(unique))
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    if mode == "swap" and len(unique) != 1:
        raise ValueError(f"swap runs one task per batch, this batch has rows {unique}")
    return rows, unique, mode


def run_grouped(bank: BiasBank, batch, rows: list[int], unique: list[int], run_one) -> BatchOutput:
    """Group mode: `run_one(part, row)` -> (logits, widths) on each task's inputs alone, scattered back in order."""
    b = len(rows)
    m = max(bank.info[r].count for r in unique)
    logits, widths = torch.zeros(b, m), [0] * b
    device = next(iter(batch.values())).device
    for r in unique:
        idx = [i for i, x in enumerate(rows) if x == r]
        take = torch.tensor(idx, device=device)
        out, w = run_one({k: v.index_select(0, take) for k, v in batch.items()}, r)
        logits[idx, : out.shape[1]] = out
        for i, width in zip(idx, w):
            widths[i] = width
    return BatchOutput(logits, widths, "group")


def run_heads(bank: BiasBank, hidden, mask, pooler, rows: list[int]) -> tuple[torch.Tensor, list[int]]:
    """Pool once per pooling kind in the batch, then every row's own head in one batched product, in float32.

    Shared by every backend: hidden (b, t, h) and pooler (b, h) or None, on the bank's device."""
    device = hidden.device
    used, which = bank.poolings(rows)
    pooled = [pool(hidden, mask, p, pooler).float() for p in used]  # each (b, h)
    if len(pooled) == 1:
        x = pooled[0]
    else:
        pick = torch.tensor(which, device=device)
        x = torch.stack(pooled)[pick, torch.arange(len(rows), device=device)]  # (b, h)
    idx, widths = bank.head_index(rows)  # (b, m)
    weight, bias = bank.head_weight[idx], bank.head_bias[idx]  # (b, m, h), (b, m)
    logits = torch.baddbmm(bias.unsqueeze(-1), weight, x.unsqueeze(-1)).squeeze(-1)  # (b, m)
    return logits.cpu(), widths


class TorchEngine:
    name = "torch"

    def __init__(
        self,
        backbone: Backbone,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str = torch.float32,
        compile: bool = False,
        capacity: int = 8,
    ):
        """Take ownership of `backbone` (its model is cast, moved and rewired in place).

        The spec (fingerprint, pooler, widths) is taken from the float32 model before any cast, so bias sets
        trained in float32 on the CPU apply to a bfloat16 model on a GPU.
        """
        dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        self.backbone, self.layout = backbone, backbone.layout
        self.spec = ServingSpec.of(backbone)
        self.device, self.dtype = torch.device(device), dtype
        self.model = backbone.model.to(device=self.device, dtype=dtype).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.slots = list(zip(self.layout.slots, self.layout.modules(self.model)))  # (slot, base module)
        self.flat = torch.zeros(self.layout.size, device=self.device, dtype=dtype)  # (N,) the live biases
        flatten_biases(self.slots, self.flat)
        self.bank = BiasBank(self.spec, backbone.original, device=self.device, dtype=dtype, capacity=capacity)
        self.mapping = BatchMapping()
        self.layers = wrap_slots(self.model, self.layout.slots, self.bank, self.mapping)
        self._zero_for_gather = needs_zero_flat(self.layers)  # some wrapper adds its own (then zero) bias
        self.base = backbone.original.to(self.device, dtype)  # (N,) for resetting to the pre-trained model
        self.flat.copy_(self.base)
        self._in_flat: tuple[int, int] | None = (-1, -1)  # (row, bank generation) in the flat buffer; None: zeros
        self.encoder = Encoder(backbone.tokenizer, backbone.max_length)
        self.forward = torch.compile(self.model, dynamic=True) if compile else self.model

    @property
    def tokenizer(self):
        return self.backbone.tokenizer

    @property
    def max_length(self) -> int:
        return self.backbone.max_length

    def encode(self, items: Sequence[Item]) -> tuple[dict[str, torch.Tensor], list[bool]]:
        return self.encoder.padded(items, self.device)

    def collate(self, encoded: Sequence[Encoded]) -> dict[str, torch.Tensor]:
        return self.encoder.collate(encoded, self.device)

    # -- running a batch -------------------------------------------------------------------------------

    @torch.inference_mode()
    def run(self, batch: dict[str, torch.Tensor], rows: Sequence[int] | torch.Tensor, mode: str | None = None) -> BatchOutput:
        """Outputs for a batch whose input i belongs to bank row `rows[i]`.

        `mode` None picks swap for one task and gather for several; tests force each mode.
        """
        rows, unique, mode = batch_plan(self.bank, rows, mode)
        if mode == "group":
            return run_grouped(self.bank, batch, rows, unique, self._run_one)
        if mode == "swap":
            self._swap_in(unique[0])
            hidden, pooler = self._forward(batch)
        else:
            hidden, pooler = self._gather_forward(batch, rows)
        logits, widths = self._heads(hidden, batch["attention_mask"], pooler, rows)
        return BatchOutput(logits, widths, mode)

    def _forward(self, batch):
        out = self.forward(**batch)
        return out.last_hidden_state, getattr(out, "pooler_output", None)  # (b, t, h), (b, h) or None

    def _swap_in(self, row: int) -> None:
        """Copy one task's row into the flat buffer, unless it is there already (same row, same content)."""
        state = (row, self.bank.generation)
        if self._in_flat != state:
            self.flat.copy_(self.bank.rows[row])
            self._in_flat = state

    def _gather_forward(self, batch, rows: list[int]):
        if self._zero_for_gather and self._in_flat is not None:
            self.flat.zero_()  # a generic wrapper runs its module with its own bias: it must add nothing
            self._in_flat = None
        self.mapping.rows = torch.tensor(rows, dtype=torch.long).to(self.device, non_blocking=True)  # (b,)
        try:
            return self._forward(batch)
        finally:
            self.mapping.rows = None

    def _run_one(self, part, row: int) -> tuple[torch.Tensor, list[int]]:
        self._swap_in(row)
        hidden, pooler = self._forward(part)
        return self._heads(hidden, part["attention_mask"], pooler, [row] * part["attention_mask"].shape[0])

    def _heads(self, hidden, mask, pooler, rows: list[int]) -> tuple[torch.Tensor, list[int]]:
        return run_heads(self.bank, hidden, mask, pooler, rows)

    def reset(self) -> None:
        """Put the pre-trained biases back into the flat buffer."""
        self.flat.copy_(self.base)
        self._in_flat = (-1, -1)


Engine = TorchEngine  # the default backend's engine
