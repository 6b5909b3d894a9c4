"""Inputs: the server's tokeniser (the fast tokenizer's Rust backend, called once per request) gives exactly what
the tokenizer's own call gives — ids, type ids, masks and the truncation flag — and pads on the right side."""

from __future__ import annotations

import pytest

from server.runtime.inputs import Encoded, Encoder, padded_tokens

LONG = "word " * 400
TEXTS = ["a gripping, beautifully acted film", "", "   ", "Ünïcödé ✓ 🎉", "dull.", LONG, "the " * 126]
PAIRS = [("A man plays a guitar.", "Someone makes music."), ("a", LONG), (LONG, LONG), ("", "x"), ("x " * 60, "y " * 70)]


@pytest.fixture(scope="module")
def encoder(minilm_backbone):
    return Encoder(minilm_backbone.tokenizer, minilm_backbone.max_length)


@pytest.mark.parametrize("items", [TEXTS, PAIRS, TEXTS[:3] + PAIRS[:3]], ids=["texts", "pairs", "mixed"])
def test_fast_path_equals_the_tokenizers_own_call(encoder, items):
    assert encoder.rust is not None, "the packaged MiniLM has a fast tokenizer"
    assert encoder.encode(items) == encoder.encode_slow(items)


def test_real_glue_inputs_tokenise_as_training_does(encoder, glue_dir):
    from bitfit.data import load_task

    for folder in ("SST-2", "MRPC"):
        dev = load_task(glue_dir / folder).dev[:200]
        items = [e.text if e.pair is None else (e.text, e.pair) for e in dev]
        assert encoder.encode(items) == encoder.encode_slow(items), folder


def test_truncation_is_flagged_and_cut_to_the_model_maximum(encoder):
    out = encoder.encode(["short", LONG, ("a", LONG), ("a", "b")])
    assert [e.truncated for e in out] == [False, True, True, False]
    assert [e.length for e in out][1:3] == [encoder.max_length] * 2


def test_collate_pads_to_the_longest_on_the_tokenizer_side(encoder):
    a, b = Encoded({"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1]}, False), Encoded(
        {"input_ids": [4], "attention_mask": [1]}, False)
    batch = encoder.collate([a, b])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, encoder.pad_id, encoder.pad_id]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    encoder.left = True
    try:
        assert encoder.collate([a, b])["input_ids"].tolist() == [[1, 2, 3], [encoder.pad_id, encoder.pad_id, 4]]
    finally:
        encoder.left = False
    assert padded_tokens([3, 1]) == 6 and padded_tokens([]) == 0
