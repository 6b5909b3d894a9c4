"""Decoding a `bitfit.lm.LanguageModel` with a KV cache: greedy and beam search, eos and stop sequences.

Plain functions on token ids. The model-side pieces are separate so that a server's continuous batching
can drive them itself:

- `left_pad(prompts, pad_id)` → `input_ids`, `attention_mask` (b, t), prompts padded on the left;
- `prefill(model, input_ids, attention_mask)` → logits of each row's last prompt token (b, vocab) and the
  KV cache (a transformers `DynamicCache`);
- `decode_step(model, tokens, cache, attention_mask, positions)` → logits (b, vocab) for one new token per
  row; the cache grows by that position. Rows may be dropped or reordered between steps with
  `cache.reorder_cache(rows)` and the same index on the mask and positions (beam search does).

Position ids follow the attention mask (`positions_of`), so a left-padded row is computed as the same
row alone would be: the padding is never attended and never shifts a position.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from tqdm import tqdm

Decode = Callable[[list[int]], str]  # token ids -> text (a tokenizer's decode)


def positions_of(attention_mask: torch.Tensor) -> torch.Tensor:
    """(b, t) position ids counting attended tokens only; padding gets 0 (it is never attended)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty; generation needs at least one prompt token")
        ids[i, width - len(p) :], mask[i, width - len(p) :] = torch.tensor(list(p)), 1
    return ids, mask


def device_of(model) -> torch.device:
    return model.backbone.get_input_embeddings().weight.device


def _forward(model, input_ids, attention_mask, positions, cache=None) -> torch.Tensor:
    out = model.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, cache=cache,
                         use_cache=cache is not None)
    return model.logits(out.last_hidden_state[:, -1])  # (b, vocab): only the last position is needed


@torch.no_grad()
def prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """Run the prompts (left-padded) once; (last-token logits (b, vocab), KV cache)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.backbone.config)
    return _forward(model, input_ids, attention_mask, positions_of(attention_mask), cache), cache


@torch.no_grad()
def decode_step(model, tokens: torch.Tensor, cache, attention_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One new token per row: tokens (b,), attention_mask (b, cached + 1) including the new position, positions
    (b,) of the new tokens. Returns logits (b, vocab); `cache` now holds the new position too."""
    return _forward(model, tokens[:, None], attention_mask, positions[:, None], cache)


class StopCheck:
    """Whether a row is finished: an eos token, or its text so far holds a stop sequence."""

    def __init__(self, eos: Sequence[int], stop: Sequence[str] = (), decode: Decode | None = None):
        if stop and decode is None:
            raise ValueError("stop sequences need a decode function (token ids -> text)")
        self.eos, self.stop, self.decode = set(eos), tuple(stop), decode

    def is_eos(self, token: int) -> bool:
        return token in self.eos

    def hit(self, tokens: list[int]) -> bool:
        if not self.stop:
            return False
        text = self.decode(tokens)
        return any(s in text for s in self.stop)


@torch.no_grad()
def greedy(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, check: StopCheck, pad_id: int,
           use_cache: bool = True) -> list[list[int]]:
    """The most likely next token, step by step, for a batch of prompts; the new ids of each (eos excluded).

    A row leaves the batch when it is finished (eos, a stop sequence, or `max_new_tokens`). `use_cache`
    False runs the whole sequence again at every step: the reference the cached path is tested against.
    """
    out: list[list[int]] = [[] for _ in prompts]
    if max_new_tokens < 1 or not prompts:
        return out
    device = device_of(model)
    ids, mask = (t.to(device) for t in left_pad(prompts, pad_id))
    if use_cache:
        logits, cache = prefill(model, ids, mask)
    else:
        cache, logits = None, _forward(model, ids, mask, positions_of(mask))
    positions = positions_of(mask)[:, -1]  # (b,) position of each row's last token
    active = list(range(len(prompts)))  # the prompt each batch row belongs to
    for step in range(max_new_tokens):
        tokens = logits.argmax(-1)  # (rows,)
        keep = []
        for row, i in enumerate(active):
            token = int(tokens[row])
            if check.is_eos(token):
                continue
            out[i].append(token)
            if not check.hit(out[i]):
                keep.append(row)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(active):  # finished rows leave the batch
            index = torch.tensor(keep, device=device)
            if cache is not None:
                cache.reorder_cache(index)
            tokens, mask, positions, ids = tokens[index], mask[index], positions[index], ids[index]
            active = [active[r] for r in keep]
        mask = torch.cat([mask, torch.ones(len(active), 1, dtype=mask.dtype, device=device)], 1)
        positions = positions + 1
        if cache is not None:
            logits = decode_step(model, tokens, cache, mask, positions)
        else:
            ids = torch.cat([ids, tokens[:, None]], 1)
            logits = _forward(model, ids, mask, positions_of(mask))
    return out


@torch.no_grad()
def beam_search(model, prompts: Sequence[Sequence[int]], *, beams: int, max_new_tokens: int, check: StopCheck,
                pad_id: int, length_penalty: float = 1.0) -> list[list[int]]:
    """Beam search with `beams` hypotheses per prompt; the best finished one's new ids (eos excluded).

    Each step takes the 2·beams best continuations of a prompt's beams by summed log-probability; one
    ending in eos or a stop sequence is finished, scored sum / length**length_penalty (length counts the
    eos), the others refill the beams. A prompt is done once it has `beams` finished hypotheses (so width 1
    is exactly greedy); at `max_new_tokens` its running hypotheses are scored as finished too.
    """
    if beams < 1:
        raise ValueError(f"beams must be at least 1, not {beams}")
    n = len(prompts)
    if max_new_tokens < 1 or not n:
        return [[] for _ in prompts]
    device = device_of(model)
    ids, mask = (t.to(device) for t in left_pad(prompts, pad_id))
    logits, cache = prefill(model, ids, mask)
    # every prompt's row repeated `beams` times; only the first copy is live at the start
    rows = torch.arange(n, device=device).repeat_interleave(beams)
    cache.reorder_cache(rows)
    mask, positions = mask[rows], positions_of(mask)[rows, -1]
    logits = logits[rows]
    scores = torch.full((n, beams), -math.inf)
    scores[:, 0] = 0.0
    hyps: list[list[list[int]]] = [[[] for _ in range(beams)] for _ in range(n)]  # running tokens per beam
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(n)]
    active = list(range(n))  # prompts still searching, in batch order (beams rows each)

    def finish(i: int, score: float, tokens: list[int], length: int) -> None:
        finished[i].append((score / max(length, 1) ** length_penalty, tokens))

    for step in range(max_new_tokens):
        logp = torch.log_softmax(logits.float(), -1).cpu()  # (active·beams, vocab)
        vocab = logp.shape[-1]
        total = (scores[active].reshape(-1, 1) + logp).view(len(active), beams * vocab)
        top, where = total.topk(min(2 * beams, total.shape[1]), dim=1)  # (active, 2·beams)
        next_rows, next_tokens, next_active = [], [], []
        for a, i in enumerate(active):
            new_hyps, new_scores, sources, toks = [], [], [], []
            for score, flat in zip(top[a].tolist(), where[a].tolist()):
                if score == -math.inf or len(new_hyps) == beams:
                    break
                beam, token = divmod(flat, vocab)
                tokens = hyps[i][beam] + [token]
                if check.is_eos(token):
                    finish(i, score, hyps[i][beam], len(tokens))
                elif check.hit(tokens):
                    finish(i, score, tokens, len(tokens))
                else:
                    new_hyps.append(tokens), new_scores.append(score), sources.append(beam), toks.append(token)
                if len(finished[i]) >= beams:
                    break
            if len(finished[i]) >= beams or not new_hyps:
                continue
            if step == max_new_tokens - 1:  # out of length: the running ones are as finished as they get
                for tokens, score in zip(new_hyps, new_scores):
                    finish(i, score, tokens, len(tokens))
                continue
            while len(new_hyps) < beams:  # fewer live continuations than beams: pad with dead rows
                new_hyps.append(list(new_hyps[0])), new_scores.append(-math.inf)
                sources.append(sources[0]), toks.append(toks[0])
            hyps[i] = new_hyps
            scores[i] = torch.tensor(new_scores)
            next_rows += [a * beams + s for s in sources]
            next_tokens += toks
            next_active.append(i)
        if not next_active:
            break
        index = torch.tensor(next_rows, device=device)
        cache.reorder_cache(index)
        mask = torch.cat([mask[index], torch.ones(len(next_rows), 1, dtype=mask.dtype, device=device)], 1)
        positions = positions[index] + 1
        active = next_active
        logits = decode_step(model, torch.tensor(next_tokens, device=device), cache, mask, positions)
    return [max(f, key=lambda x: x[0])[1] if f else [] for f in finished]


def generate_texts(model, tokenizer, prompts: Sequence[str], *, stop: Sequence[str] = (), max_new_tokens: int = 64,
                   beams: int = 1, length_penalty: float = 1.0, batch_size: int = 32, progress: bool = False,
                   desc: str = "generate") -> list[str]:
    """Texts for prompt strings, cut before the first stop sequence and stripped; in the order given.

    Prompts run in batches of similar length (less padding); a beam batch holds batch_size // beams prompts.
    """
    from bitfit.lm import cut_at_stop, eos_ids

    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    check = StopCheck(eos_ids(tokenizer), stop, decode)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    per = max(1, batch_size // beams) if beams > 1 else batch_size
    out: list[str | None] = [None] * len(ids)
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(ids), desc=desc, disable=not progress)
    for start in range(0, len(order), per):
        chunk = order[start : start + per]
        batch = [ids[i] for i in chunk]
        if beams > 1:
            new = beam_search(model, batch, beams=beams, max_new_tokens=max_new_tokens, check=check, pad_id=pad,
                              length_penalty=length_penalty)
        else:
            new = greedy(model, batch, max_new_tokens=max_new_tokens, check=check, pad_id=pad)
        for i, tokens in zip(chunk, new):
            out[i] = cut_at_stop(decode(tokens), stop)[0].strip()
        bar.update(len(chunk))
    bar.close()
    model.train(was_training)
    return out
