"""Hostile and broken uploads: each is refused with its own message, and the store is left byte-identical."""

from __future__ import annotations

import io
import json
import pickle

import numpy as np
import pytest
import torch
from test_store_support import HIDDEN, parts, raw, snapshot, tiny_layout, tiny_spec, valid_bytes, with_header

from bias_store import BiasStore, InvalidBiasSet, InvalidTaskName, PayloadTooLarge, validate

MAX_BYTES = 256 * 1024  # the store limit in these tests; a tiny bias set is ~3 KiB


def _broken(edit_tensors=None, edit_meta=None, **kw):
    """A valid tiny bias set for task sst2, with its tensors and/or metadata edited in place."""

    def build(layout):
        tensors, meta = parts(layout, **kw)
        if edit_tensors:
            edit_tensors(tensors)
        if edit_meta:
            edit_meta(meta)
        return raw(tensors, meta)

    return build


def _set(d, k, v):
    d[k] = v


def _pickle(layout):
    return pickle.dumps({"delta": [0.0] * layout.size, "head.out.weight": [[0.0] * HIDDEN] * 2})


def _torch_save(layout):
    buf = io.BytesIO()
    torch.save({"delta": torch.zeros(layout.size)}, buf)
    return buf.getvalue()


def _overlapping(layout):
    n = layout.size * 4
    header = {
        "delta": {"dtype": "F32", "shape": [layout.size], "data_offsets": [0, n]},
        "head.out.weight": {"dtype": "F32", "shape": [2, HIDDEN], "data_offsets": [0, 2 * HIDDEN * 4]},
        "head.out.bias": {"dtype": "F32", "shape": [2], "data_offsets": [n, n + 8]},
    }
    return with_header(header, bytes(n + 8))


def _no_metadata(layout):
    tensors, _ = parts(layout)
    return raw(tensors, None)


def _nested_metrics(meta):
    meta["metrics"] = "[" * 4000 + "]" * 4000


def _duplicate_keys(layout):
    h = b'{"delta": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}, ' \
        b'"delta": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}'  # fmt: skip
    return with_header(h)


# (id, builder(layout) -> bytes, expected error, fragment of its message)
CORPUS = [
    ("pickle-renamed", _pickle, InvalidBiasSet, "file is a Python pickle, not safetensors"),
    ("torch-save-zip", _torch_save, InvalidBiasSet, "file is a zip archive (torch.save"),
    ("too-short", lambda L: b"\x01\x02\x03", InvalidBiasSet, "file is 3 bytes, too short for safetensors"),
    ("truncated-data", lambda L: valid_bytes(L)[:-100], InvalidBiasSet,
     "file is truncated: the header describes"),
    ("truncated-header", lambda L: valid_bytes(L)[:40], InvalidBiasSet,
     "file is truncated or not safetensors: the header claims"),
    ("header-not-json", lambda L: with_header(b"{not json at all"), InvalidBiasSet,
     "safetensors header is not valid JSON"),
    ("header-not-utf8", lambda L: with_header(b'{"\xff\xfe": 1}'), InvalidBiasSet, "safetensors header is not UTF-8"),
    ("header-duplicate-keys", _duplicate_keys, InvalidBiasSet, "duplicate keys ['delta']"),
    ("header-huge", lambda L: with_header(b"{" + b" " * 100_000 + b"}"), InvalidBiasSet,
     "safetensors header claims 100,002 bytes, over the limit of 65,536"),
    ("offsets-overlap", _overlapping, InvalidBiasSet, "overlaps the previous tensor"),
    ("bytes-after-tensors", lambda L: valid_bytes(L) + b"\0" * 16, InvalidBiasSet,
     "file has 16 bytes after the last tensor"),
    ("unknown-dtype", lambda L: with_header({"delta": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}}, b"\0"),
     InvalidBiasSet, "tensor 'delta' has unknown dtype 'Q7'"),
    ("wrong-delta-shape", _broken(lambda t: _set(t, "delta", np.zeros(586 + 3, np.float32))), InvalidBiasSet,
     "tensor 'delta' has shape [589], expected [586]"),
    ("extra-tensor", _broken(lambda t: _set(t, "head.hidden.weight", np.zeros((2, 2), np.float32))), InvalidBiasSet,
     "unexpected tensor 'head.hidden.weight'"),
    ("missing-tensor", _broken(lambda t: t.pop("head.out.bias")), InvalidBiasSet, "missing tensor 'head.out.bias'"),
    ("nan-in-delta", _broken(lambda t: t["delta"].__setitem__(7, np.nan)), InvalidBiasSet,
     "tensor 'delta' has 1 NaN and 0 infinite values"),
    ("inf-in-head", _broken(lambda t: t["head.out.weight"].__setitem__((1, 3), -np.inf)), InvalidBiasSet,
     "tensor 'head.out.weight' has 0 NaN and 1 infinite values"),
    ("float64-delta", _broken(lambda t: _set(t, "delta", t["delta"].astype(np.float64))), InvalidBiasSet,
     "tensor 'delta' is float64, expected float32"),
    ("other-backbone", lambda L: valid_bytes(tiny_layout(seed=1)), InvalidBiasSet,
     "bias set was trained on backbone"),
    ("oversize-file", lambda L: b"\0" * (MAX_BYTES + 1), PayloadTooLarge,
     f"bias set is {MAX_BYTES + 1:,} bytes, over the store's limit of {MAX_BYTES:,} bytes"),
    ("huge-metadata-value", _broken(edit_meta=lambda m: _set(m, "train_args", json.dumps({"x": "y" * 20_000}))),
     InvalidBiasSet, "metadata 'train_args' is 20,009 characters, over the limit of 8,192"),
    ("malformed-metrics-json", _broken(edit_meta=lambda m: _set(m, "metrics", "{accuracy: 0.9")), InvalidBiasSet,
     "metadata 'metrics' is not valid JSON"),
    ("deeply-nested-metrics-json", _broken(edit_meta=_nested_metrics), InvalidBiasSet,
     "metadata 'metrics' is not valid JSON: maximum recursion depth"),
    ("metrics-not-object", _broken(edit_meta=lambda m: _set(m, "metrics", "[1, 2]")), InvalidBiasSet,
     "metadata 'metrics' must be a JSON dict, got list"),
    ("no-metadata", _no_metadata, InvalidBiasSet, "file has no metadata"),
    ("unknown-metadata-key", _broken(edit_meta=lambda m: _set(m, "payload", "x")), InvalidBiasSet,
     "unknown metadata key 'payload'"),
    ("wrong-format", _broken(edit_meta=lambda m: _set(m, "format", "gguf")), InvalidBiasSet,
     "metadata format is 'gguf', expected 'bitfit-bias-set'"),
    ("head-label-mismatch", _broken(edit_meta=lambda m: _set(m, "labels", '["a", "b", "c"]')), InvalidBiasSet,
     "tensor 'head.out.weight' has shape [2, 32], expected [3, 32]"),
    ("regression-head-too-wide", _broken(edit_meta=lambda m: _set(m, "labels", "[]")), InvalidBiasSet,
     "tensor 'head.out.bias' has shape [2], expected [1]"),
    ("head-wrong-hidden", _broken(lambda t: _set(t, "head.out.weight", np.zeros((2, 16), np.float32))),
     InvalidBiasSet, "tensor 'head.out.weight' has shape [2, 16], expected [2, 32]"),
    ("duplicate-labels", _broken(labels=("pos", "pos")), InvalidBiasSet, "labels must be unique; repeated: ['pos']"),
    ("empty-label", _broken(labels=("", "pos")), InvalidBiasSet, "labels must be non-empty strings"),
    ("single-label", _broken(labels=("only",)), InvalidBiasSet, "a classifier needs at least 2 labels"),
    ("labels-not-strings", _broken(edit_meta=lambda m: _set(m, "labels", "[1, 2]")), InvalidBiasSet,
     "labels must be strings"),
    ("unknown-pooling", _broken(edit_meta=lambda m: _set(m, "pooling", "max")), InvalidBiasSet,
     "unknown pooling 'max'"),
    ("task-mismatch", _broken(edit_meta=lambda m: _set(m, "task", "cola")), InvalidBiasSet,
     "metadata names task 'cola' but the file is being stored under 'sst2'"),
    ("bad-created-at", _broken(edit_meta=lambda m: _set(m, "created_at", "yesterday")), InvalidBiasSet,
     "metadata created_at 'yesterday' is not an ISO 8601 time"),
]  # fmt: skip

BAD_TASK_NAMES = [
    ("dot-dot-slash", "../x", "contains a path separator"),
    ("slash", "a/b", "contains a path separator"),
    ("backslash", "a\\b", "contains a path separator"),
    ("empty", "", "task name is empty"),
    ("65-chars", "a" * 65, "task name is 65 characters long, the limit is 64"),
    ("fullwidth-lookalike", "ＳＳＴ2", "contains the non-ASCII character 'Ｓ' (U+FF33 FULLWIDTH LATIN CAPITAL LETTER S)"),
    ("cyrillic-lookalike", "sst\u0430", "non-ASCII character 'а' (U+0430 CYRILLIC SMALL LETTER A)"),
    ("upper-case", "SST2", "contains upper-case letters (try 'sst2')"),
    ("dot-dot", "..", "starts with '.'"),
    ("leading-dash", "-x", "task name '-x' is invalid"),
    ("space", "a b", "task name 'a b' is invalid"),
    ("trailing-newline", "sst2\n", "task name 'sst2\\n' is invalid"),
]


@pytest.fixture
def store(tmp_path):
    """A store that already holds one task, so an unchanged snapshot means something."""
    s = BiasStore(tmp_path / "store", tiny_spec(), max_bytes=MAX_BYTES)
    s.put("sst2", valid_bytes(tiny_layout(), seed=1))
    s.put("cola", valid_bytes(tiny_layout(), task="cola", labels=("bad", "good")))
    return s


def test_a_valid_tiny_bias_set_passes():
    assert validate(valid_bytes(tiny_layout()), tiny_spec(), max_bytes=MAX_BYTES) == []


@pytest.mark.parametrize("build,error,message", [c[1:] for c in CORPUS], ids=[c[0] for c in CORPUS])
def test_hostile_upload_is_refused_with_its_message_and_store_unchanged(store, build, error, message):
    data = build(tiny_layout())
    before, generation = snapshot(store.root), store.generation()
    with pytest.raises(error) as exc:
        store.put("sst2", data)
    assert message in str(exc.value)
    if error is InvalidBiasSet:
        assert any(message in p for p in exc.value.problems)
        assert any(message in p for p in validate(data, tiny_spec(), max_bytes=MAX_BYTES, task="sst2"))
    assert snapshot(store.root) == before
    assert store.generation() == generation


def test_corpus_is_large_and_messages_are_distinct():
    assert len(CORPUS) >= 20
    assert len({c[3] for c in CORPUS}) == len(CORPUS)


@pytest.mark.parametrize("name,message", [c[1:] for c in BAD_TASK_NAMES], ids=[c[0] for c in BAD_TASK_NAMES])
def test_bad_task_name_is_refused_and_store_unchanged(store, name, message):
    before = snapshot(store.root)
    with pytest.raises(InvalidTaskName) as exc:
        store.put(name, valid_bytes(tiny_layout()))
    assert message in str(exc.value)
    for call in (store.task, store.read, store.delete_task, lambda n: store.activate(n, "x")):
        with pytest.raises(InvalidTaskName):
            call(name)
    assert snapshot(store.root) == before


def test_validation_reports_every_problem_not_just_the_first():
    tensors, meta = parts(tiny_layout())
    tensors["delta"] = tensors["delta"].astype(np.float64)
    tensors["extra"] = np.zeros(1, np.float32)
    meta["pooling"] = "max"
    meta["labels"] = '["a", "a"]'
    problems = validate(raw(tensors, meta), tiny_spec(), max_bytes=MAX_BYTES)
    assert len(problems) == 4, problems
    assert [p.split(" ")[0] for p in problems] == ["unexpected", "tensor", "unknown", "labels"]


def test_store_without_layout_skips_only_backbone_checks(tmp_path):
    offline = BiasStore(tmp_path, spec=None, max_bytes=MAX_BYTES)
    offline.put("sst2", valid_bytes(tiny_layout(seed=1)))  # another backbone: fine offline
    tensors, meta = parts(tiny_layout())
    tensors["delta"][0] = np.nan
    with pytest.raises(InvalidBiasSet, match="1 NaN"):
        offline.put("sst2", raw(tensors, meta))


@pytest.mark.slow
def test_real_minilm_bias_set_validates_and_a_tiny_one_does_not(minilm_backbone):
    from bitfit.bias_set import BiasSet

    from bitfit.spec import ServingSpec

    layout, spec = minilm_backbone.layout, ServingSpec.of(minilm_backbone)
    assert spec.hidden == minilm_backbone.hidden_size == 384
    bs = BiasSet(
        task="sst2",
        delta=torch.zeros(layout.size),
        head={"out.weight": torch.randn(2, 384), "out.bias": torch.zeros(2)},
        labels=["negative", "positive"],
        fingerprint=layout.fingerprint,
    )
    data = bs.to_bytes()
    assert validate(data, spec, max_bytes=16 * 2**20, task="sst2") == []
    problems = validate(valid_bytes(tiny_layout()), spec, max_bytes=16 * 2**20)
    assert any("trained on backbone" in p for p in problems)
    assert any(f"expected [{layout.size}]" in p for p in problems)
