"""Inputs: tokenised when a request is submitted, padded into a batch on the worker.

Tokenising at submit (on the event loop, where the fast tokenizer's Rust code runs while the model thread
computes) leaves the worker only the padding of lists into tensors, so the next batch is ready as soon as one
ends. `Encoded.length` is what the runner's token budget counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

Item = str | tuple[str, str]  # one input: a text, or a pair of texts


@dataclass(frozen=True)
class Encoded:
    """One tokenised input."""

    features: dict[str, list[int]]  # input_ids, attention_mask, and token_type_ids where the model has them
    truncated: bool  # it was longer than the model's maximum and was cut

    @property
    def length(self) -> int:
        return len(self.features["input_ids"])


def rust_tokenizer(tokenizer, max_length: int):
    """A private copy of a fast tokenizer's Rust backend, set to truncate as `tokenizer(..., truncation=...,
    max_length=...)` does and never to pad; None for a slow tokenizer.

    `transformers` configures that same backend and calls its `encode_batch` on every call, after about 0.2 ms
    of Python per call; a server that tokenises each request as it arrives pays that per request.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    from tokenizers import Tokenizer

    rust = Tokenizer.from_str(backend.to_str())
    rust.no_padding()
    rust.enable_truncation(max_length, strategy="longest_first", direction=getattr(tokenizer, "truncation_side", "right"))
    rust.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))
    return rust


class Encoder:
    """Tokenise texts and pairs the way training did, and pad them into batches."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length
        self.pad_id = tokenizer.pad_token_id or 0
        self.left = getattr(tokenizer, "padding_side", "right") == "left"
        self.rust = rust_tokenizer(tokenizer, max_length)
        names = list(getattr(tokenizer, "model_input_names", ["input_ids", "attention_mask"]))
        self.keys = [k for k in ("input_ids", "token_type_ids", "attention_mask") if k in names]

    def encode(self, items: Sequence[Item]) -> list[Encoded]:
        """Longer inputs are truncated to the model's maximum (pairs longest-first) and flagged."""
        if self.rust is not None:
            return [self._from_encoding(e) for e in self.rust.encode_batch(list(items), add_special_tokens=True)]
        return self.encode_slow(items)

    def _from_encoding(self, e) -> Encoded:
        values = {"input_ids": e.ids, "token_type_ids": e.type_ids, "attention_mask": e.attention_mask}
        return Encoded({k: values[k] for k in self.keys}, bool(e.overflowing))

    def encode_slow(self, items: Sequence[Item]) -> list[Encoded]:
        """Through the tokenizer's own call (slow tokenizers; and the reference the fast path is tested against)."""
        out: list[Encoded | None] = [None] * len(items)
        singles = [i for i, x in enumerate(items) if isinstance(x, str)]
        pairs = [i for i, x in enumerate(items) if not isinstance(x, str)]
        for idx, args, how in (
            (singles, ([items[i] for i in singles],), True),
            (pairs, ([items[i][0] for i in pairs], [items[i][1] for i in pairs]), "longest_first"),
        ):
            if not idx:
                continue
            enc = self.tokenizer(*args, truncation=how, max_length=self.max_length)
            encodings = getattr(enc, "encodings", None)
            keys = list(enc.keys())
            for j, i in enumerate(idx):
                cut = bool(encodings[j].overflowing) if encodings else len(enc["input_ids"][j]) >= self.max_length
                out[i] = Encoded({k: enc[k][j] for k in keys}, cut)
        return out  # type: ignore[return-value]

    def collate(self, batch: Sequence[Encoded], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Pad to the longest input of the batch, on the tokenizer's padding side: tensors (b, t)."""
        width = max(e.length for e in batch)
        out = {}
        for key in batch[0].features:
            fill = self.pad_id if key == "input_ids" else 0
            rows = []
            for e in batch:
                values = e.features[key]
                pad = [fill] * (width - len(values))
                rows.append(pad + values if self.left else values + pad)
            out[key] = torch.tensor(rows, dtype=torch.long, device=device)
        return out

    def padded(self, items: Sequence[Item], device: torch.device | str = "cpu") -> tuple[dict[str, torch.Tensor], list[bool]]:
        """Tokenise and pad in one step, with each input's truncation flag (tests and tools; the server tokenises
        at submit and pads on the worker)."""
        encoded = self.encode(items)
        return self.collate(encoded, device), [e.truncated for e in encoded]


def padded_tokens(lengths: Sequence[int]) -> int:
    """What a batch of these lengths costs once padded: inputs × the longest."""
    return len(lengths) * max(lengths) if lengths else 0
