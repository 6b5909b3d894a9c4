"""Picking each sequence's next token: greedy at temperature 0, else temperature and nucleus (top_p) sampling.

Every sequence draws from its own `torch.Generator`, seeded by the request's `seed` (a random one if none), so a
seeded request gives the same tokens whatever else shares its batch: the batch's logits are the row's own.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16  # new tokens at most (eos and stop sequences end earlier)
    temperature: float = 1.0  # 0: greedy (argmax)
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p
    seed: int | None = None  # None: a random seed
    stop: tuple[str, ...] = ()  # the task's stop sequences and the request's
    ignore_eos: bool = False  # go on past eos (benchmarks: every sequence makes exactly max_tokens)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass
class Sampler:
    """One sequence's token picker, with its own random stream."""

    params: SamplingParams
    generator: torch.Generator = field(init=False)

    def __post_init__(self):
        seed = self.params.seed if self.params.seed is not None else random.randrange(1 << 62)
        self.generator = torch.Generator().manual_seed(seed)

    def pick(self, logits: torch.Tensor) -> int:
        """The next token from one row's logits (vocab,), float32 on the CPU."""
        p = self.params
        if p.greedy:
            return int(logits.argmax())
        probs = torch.softmax(logits / p.temperature, -1)
        if p.top_p < 1.0:
            probs = nucleus(probs, p.top_p)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """`probs` (vocab,) with everything outside the top-p nucleus zeroed (the most likely token always stays)."""
    sorted_p, order = probs.sort(descending=True)
    before = sorted_p.cumsum(-1) - sorted_p  # probability of the tokens ranked above each one
    sorted_p[before >= top_p] = 0.0
    out = torch.zeros_like(probs)
    out[order] = sorted_p
    return out / out.sum()


def pick_tokens(logits: torch.Tensor, samplers: list[Sampler]) -> list[int]:
    """One token per row of logits (b, vocab); greedy rows in one argmax, the others one by one."""
    logits = logits.float().cpu()
    if all(s.params.greedy for s in samplers):
        return logits.argmax(-1).tolist()
    best = logits.argmax(-1).tolist()
    return [best[i] if s.params.greedy else s.pick(logits[i]) for i, s in enumerate(samplers)]
