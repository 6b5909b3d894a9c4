"""Corpus BLEU for generation tasks (sacrebleu: lowercase, 13a tokenisation, every reference of an input),
and scoring a model on grouped references (generate, then BLEU).

E2E inputs have 1 to ~40 references each; sacrebleu takes reference *streams* aligned with the outputs, so
the streams are padded with None where an input has fewer references, which sacrebleu skips (its
signature then reads `nrefs:var`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

SETTINGS = {"lowercase": True, "tokenize": "13a"}


def reference_streams(references: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """Per-input reference lists → sacrebleu's streams (stream k holds every input's k-th reference, or None)."""
    if any(not refs for refs in references):
        raise ValueError("every input needs at least one reference")
    width = max(len(r) for r in references)
    return [[refs[k] if k < len(refs) else None for refs in references] for k in range(width)]


def corpus_bleu(outputs: Sequence[str], references: Sequence[Sequence[str]]):
    """(sacrebleu's BLEUScore, its signature) of `outputs` against all references of each input.

    The signature names every setting that made the number (e.g. `nrefs:var|case:lc|eff:no|tok:13a|...`)."""
    from sacrebleu.metrics import BLEU

    if len(outputs) != len(references):
        raise ValueError(f"{len(outputs)} outputs but {len(references)} reference lists")
    # force: E2E references are tokenised ("rating ." with a space), and so are outputs trained on them; sacrebleu
    # would warn on every run. It changes no number (13a re-tokenises either way).
    metric = BLEU(**SETTINGS, force=True)
    score = metric.corpus_score(list(outputs), reference_streams(references))
    return score, str(metric.get_signature())


def evaluate_bleu(model, tokenizer, grouped, *, template: str, stop: Sequence[str], beams: int = 1,
                  max_new_tokens: int = 64, length_penalty: float = 1.0, batch_size: int = 32,
                  progress: bool = True) -> dict:
    """Generate for each grouped input (`bitfit.e2e.Grouped`) and score BLEU; a results dict with outputs."""
    from bitfit.generate import generate_texts
    from bitfit.lm import render_prompt

    start = time.perf_counter()
    outputs = generate_texts(model, tokenizer, [render_prompt(template, g.source) for g in grouped], stop=stop,
                             max_new_tokens=max_new_tokens, beams=beams, length_penalty=length_penalty,
                             batch_size=batch_size, progress=progress, desc="greedy" if beams == 1 else f"beam {beams}")
    seconds = time.perf_counter() - start
    score, signature = corpus_bleu(outputs, [g.references for g in grouped])
    return {
        "bleu": score.score,
        "signature": signature,
        "inputs": len(grouped),
        "references": sum(len(g.references) for g in grouped),
        "decoding": "greedy" if beams == 1 else f"beam {beams}",
        "beams": beams,
        "length_penalty": length_penalty if beams > 1 else None,
        "max_new_tokens": max_new_tokens,
        "seconds": seconds,
        "outputs": outputs,
    }
