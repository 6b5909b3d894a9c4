"""The engine: one resident, frozen backbone whose biases live in one flat buffer, and a bank of tasks.

A batch arrives as token tensors plus `rows  # LongTensor [batch], bank row per input`; the engine
never sees task names, versions or HTTP. Three ways to run it, all equal to running each task alone:

- swap:   every row is one task -> copy that task's row into the flat buffer (one copy), plain forward;
- gather: several tasks -> the flat buffer holds zeros and a forward hook on every biased module adds its
          slice of ONE gathered `bank[rows]` (b, N) tensor, in place, so one forward serves them all;
- group:  several tasks -> one swap forward per task on its own rows (cheaper when few tasks share a
          long batch; the batcher decides).
Heads are applied per task afterwards (tasks may differ in label count or be regressions).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from bitfit.backbone import Backbone
from bitfit.heads import pool
from bitfit.spec import ServingSpec
from server.bank import BiasBank

Item = str | tuple[str, str]  # one input: a text, or a pair of texts
MODES = ("swap", "gather", "group")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class BatchOutput:
    outputs: list[torch.Tensor]  # per input, float32 on the CPU: logits (n_labels,) or (1,) for regression
    mode: str  # how the batch ran: swap | gather | group


def flatten_biases(slots: list[tuple], flat: torch.Tensor) -> None:
    """Make each slot's bias parameter a view into `flat`, so a whole task is swapped by one copy."""
    for slot, module in slots:  # (BiasSlot, module) pairs
        view = flat[slot.offset : slot.offset + slot.size].view_as(module.bias)
        view.copy_(module.bias.detach())
        module.bias = nn.Parameter(view, requires_grad=False)
        # nn.Parameter keeps the storage it is given; check, since everything below relies on it
        assert module.bias.data_ptr() == view.data_ptr(), f"bias of {slot.path} is not a view into the flat buffer"


class Engine:
    def __init__(
        self,
        backbone: Backbone,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str = torch.float32,
        max_batch: int = 64,
    ):
        """Take ownership of `backbone` (its model is cast, moved and rewired in place).

        The layout and fingerprint were taken by `load_backbone` from the float32 weights, before any cast,
        so bias sets trained in float32 on the CPU apply to a bfloat16 model on a GPU.
        """
        dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        self.backbone = backbone
        self.layout = backbone.layout
        self.spec = ServingSpec.of(backbone)  # taken before the cast: float32 fingerprint, real pooler
        self.device, self.dtype = torch.device(device), dtype
        self.model = backbone.model.to(device=self.device, dtype=dtype).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.slots = list(zip(self.layout.slots, self.layout.modules(self.model)))
        self.flat = torch.zeros(self.layout.size, device=self.device, dtype=dtype)  # (N,) the live biases
        flatten_biases(self.slots, self.flat)
        has_pooler = getattr(self.model, "pooler", None) is not None
        self.bank = BiasBank(self.layout, backbone.original, backbone.hidden_size, device=self.device, dtype=dtype,
                             has_pooler=has_pooler)
        self.base = backbone.original.to(self.device, dtype)  # (N,) for resetting to the pre-trained model
        self.flat.copy_(self.base)
        self._in_flat: tuple[int, int] | None = (-1, -1)  # (row, bank generation) in the flat buffer; None: zeros
        self._gathered: torch.Tensor | None = None  # (b, N) during a gather forward, else None
        self._buffer = torch.empty(max_batch, self.layout.size, device=self.device, dtype=dtype)  # reused
        self._hooks = [m.register_forward_hook(self._add_gathered(s.offset, s.size)) for s, m in self.slots]
        # modules whose forward takes bias=None (exact types: a subclass may use its bias its own way)
        self._droppable = [(m, m.bias) for _, m in self.slots if type(m) in (nn.Linear, nn.LayerNorm)]

    @property
    def tokenizer(self):
        return self.backbone.tokenizer

    @property
    def max_length(self) -> int:
        return self.backbone.max_length

    # -- inputs ----------------------------------------------------------------------------------------

    def encode(self, items: Sequence[Item]) -> tuple[dict[str, torch.Tensor], list[bool]]:
        """Tokenise texts and pairs together; longer inputs are truncated to the model's maximum.

        Returns the padded batch (on the device) and, per input, whether it was truncated.
        """
        tok, n = self.tokenizer, len(items)
        features: list[dict[str, list[int]] | None] = [None] * n
        truncated = [False] * n
        singles = [i for i, x in enumerate(items) if isinstance(x, str)]
        pairs = [i for i, x in enumerate(items) if not isinstance(x, str)]
        for idx, args, how in (
            (singles, ([items[i] for i in singles],), True),
            (pairs, ([items[i][0] for i in pairs], [items[i][1] for i in pairs]), "longest_first"),
        ):
            if not idx:
                continue
            enc = tok(*args, truncation=how, max_length=self.max_length)
            encodings = getattr(enc, "encodings", None)
            for j, i in enumerate(idx):
                features[i] = {k: enc[k][j] for k in enc.keys()}
                truncated[i] = bool(encodings[j].overflowing) if encodings else len(enc["input_ids"][j]) >= self.max_length
        return self.collate(features), truncated

    def collate(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        """Pad token lists to the longest, on the tokenizer's padding side."""
        width = max(len(f["input_ids"]) for f in features)
        pad_values = {"input_ids": self.tokenizer.pad_token_id or 0}
        left = getattr(self.tokenizer, "padding_side", "right") == "left"
        out = {}
        for key in features[0]:
            fill = pad_values.get(key, 0)
            rows = []
            for f in features:
                pad = [fill] * (width - len(f[key]))
                rows.append(pad + f[key] if left else f[key] + pad)
            out[key] = torch.tensor(rows, dtype=torch.long, device=self.device)  # (b, t)
        return out

    # -- running a batch -------------------------------------------------------------------------------

    @torch.inference_mode()
    def run(self, encoded: dict[str, torch.Tensor], rows: torch.Tensor, mode: str | None = None) -> BatchOutput:
        """Outputs for a batch whose input i belongs to bank row `rows[i]`.

        `mode` None picks swap for one task and gather for several; tests force each mode.
        """
        rows = rows.to(self.device)
        unique = rows.unique().tolist()
        for r in unique:
            if r not in self.bank.heads:
                raise KeyError(f"bank row {r} holds no task")
        mode = mode or ("swap" if len(unique) == 1 else "gather")
        if mode == "swap":
            if len(unique) != 1:
                raise ValueError(f"swap runs one task per batch, this batch has rows {unique}")
            self._swap_in(unique[0])
            hidden, pooler = self._forward(encoded)
        elif mode == "gather":
            hidden, pooler = self._gather_forward(encoded, rows)
        elif mode == "group":
            return BatchOutput(self._group(encoded, rows, unique), "group")
        else:
            raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
        return BatchOutput(self._heads(hidden, encoded["attention_mask"], pooler, rows, unique), mode)

    def _forward(self, encoded):
        out = self.model(**encoded)
        return out.last_hidden_state, getattr(out, "pooler_output", None)  # (b, t, h), (b, h) or None

    def _swap_in(self, row: int) -> None:
        """Copy one task's row into the flat buffer, unless it is there already (same row, same content)."""
        state = (row, self.bank.generation)
        if self._in_flat != state:
            self.flat.copy_(self.bank.rows[row])
            self._in_flat = state

    def _gather_forward(self, encoded, rows: torch.Tensor):
        b = rows.shape[0]
        if b > self._buffer.shape[0]:
            self._buffer = torch.empty(b, self.layout.size, device=self.device, dtype=self.dtype)
        gathered = torch.index_select(self.bank.rows, 0, rows, out=self._buffer[:b])  # (b, N)
        if self._in_flat is not None:  # the hooks add every bias, so the modules' own must be zero
            self.flat.zero_()
            self._in_flat = None
        self._gathered = gathered
        for module, _ in self._droppable:  # no bias at all: F.linear / F.layer_norm skip a pass over zeros
            module._parameters["bias"] = None
        try:
            return self._forward(encoded)
        finally:
            self._gathered = None
            for module, bias in self._droppable:
                module._parameters["bias"] = bias

    def _add_gathered(self, offset: int, size: int):
        def hook(module, args, output):
            g = self._gathered
            if g is None:
                return None
            if not isinstance(output, torch.Tensor) or output.shape[0] != g.shape[0] or output.shape[-1] != size:
                # a silent broadcast here would mix rows of different tasks: refuse instead
                raise RuntimeError(f"gather cannot add a ({g.shape[0]}, {size}) bias to an output of shape "
                                   f"{tuple(output.shape)}")
            part = g[:, offset : offset + size]  # (b, size)
            if output.dim() == 2:  # e.g. BERT's pooler: (b, h)
                output.add_(part)
            else:  # (b, t, size), or more dims: broadcast over every middle dim
                output.add_(part.view(part.shape[0], *([1] * (output.dim() - 2)), size))
            return None

        return hook

    def _group(self, encoded, rows: torch.Tensor, unique: list[int]) -> list[torch.Tensor]:
        outputs: list[torch.Tensor | None] = [None] * rows.shape[0]
        for r in unique:
            idx = (rows == r).nonzero().squeeze(1)  # (k,)
            part = {k: v.index_select(0, idx) for k, v in encoded.items()}
            self._swap_in(r)
            hidden, pooler = self._forward(part)
            outs = self._heads(hidden, part["attention_mask"], pooler, rows.index_select(0, idx), [r])
            for i, o in zip(idx.tolist(), outs):
                outputs[i] = o
        return outputs

    def _heads(self, hidden, mask, pooler, rows: torch.Tensor, unique: list[int]) -> list[torch.Tensor]:
        """Pool once per pooling kind, then each task's head on its own rows, in float32."""
        pooled: dict[str, torch.Tensor] = {}
        outputs: list[torch.Tensor | None] = [None] * rows.shape[0]
        for r in unique:
            head = self.bank.heads[r]
            if head.pooling not in pooled:
                pooled[head.pooling] = pool(hidden, mask, head.pooling, pooler).float()  # (b, h)
            idx = (rows == r).nonzero().squeeze(1)  # (k,)
            logits = torch.addmm(head.bias, pooled[head.pooling].index_select(0, idx), head.weight.t())  # (k, n_out)
            for i, o in zip(idx.tolist(), logits.cpu()):
                outputs[i] = o
        return outputs

    def reset(self) -> None:
        """Put the pre-trained biases back into the flat buffer."""
        self.flat.copy_(self.base)
        self._in_flat = (-1, -1)
