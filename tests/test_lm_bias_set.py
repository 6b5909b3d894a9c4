"""The generation bias set: no head, a prompt template and stop sequences, an explicit kind (old files read as
classification), and the store's validation of it through the one serving spec: accepted where the backbone
can generate, refused with the reason where it cannot (an encoder), and refused when its parts are a
classification set's."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import save as st_save_numpy

from bias_store import InvalidBiasSet, open_store, validate
from bitfit.backbone import finish_backbone
from bitfit.bias_set import CLASSIFICATION, GENERATION, BiasSet
from bitfit.errors import BiasSetFormatError
from bitfit.spec import ServingSpec
from conftest import tiny_model
from test_lm import TEMPLATE, tiny_lm
from test_llm import tiny_tokenizer

MAX_BYTES = 1 << 20


def generation_set(backbone, task: str = "toy", **fields) -> BiasSet:
    g = torch.Generator().manual_seed(0)
    return BiasSet(task=task, delta=torch.randn(backbone.layout.size, generator=g) * 0.01, head={}, labels=[],
                   fingerprint=backbone.layout.fingerprint, kind=GENERATION, prompt_template=TEMPLATE,
                   stop=["\n", " END"], metrics={"loss": 1.5}, created_at="2026-01-01T00:00:00+00:00", **fields)


def raw_parts(bias_set: BiasSet) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    return {k: v.numpy().copy() for k, v in bias_set.tensors().items()}, bias_set.metadata()


@pytest.fixture(scope="module")
def lm_backbone():
    return tiny_lm()


@pytest.fixture(scope="module")
def encoder_backbone():
    return finish_backbone(tiny_model("bert"), tiny_tokenizer(), "tiny-bert")


def test_generation_set_round_trip_keeps_kind_template_and_stops_and_holds_no_head(lm_backbone):
    original = generation_set(lm_backbone)
    data = original.to_bytes()
    loaded = BiasSet.from_bytes(data)
    assert loaded.is_generation and not loaded.is_regression
    assert (loaded.prompt_template, loaded.stop, loaded.head) == (TEMPLATE, ["\n", " END"], {})
    assert torch.equal(loaded.delta, original.delta)
    assert list(loaded.tensors()) == ["delta"]
    meta = loaded.metadata()
    assert meta["kind"] == GENERATION and json.loads(meta["stop"]) == ["\n", " END"]
    assert not {"labels", "pooling", "input_kind"} & set(meta)  # a head's words; a generation set has none
    loaded.check_backbone(lm_backbone.layout)


def test_a_file_without_kind_is_a_classification_set_as_before(lm_backbone):
    old = BiasSet(task="sst2", delta=torch.zeros(lm_backbone.layout.size), labels=["neg", "pos"],
                  head={"out.weight": torch.zeros(2, 32), "out.bias": torch.zeros(2)},
                  fingerprint=lm_backbone.layout.fingerprint, pooling="last")
    assert "kind" not in old.metadata()  # classification files are written as they were
    loaded = BiasSet.from_bytes(old.to_bytes())
    assert loaded.kind == CLASSIFICATION and not loaded.is_generation and loaded.labels == ["neg", "pos"]


def test_unknown_kind_or_broken_stop_list_does_not_parse(lm_backbone):
    tensors, meta = raw_parts(generation_set(lm_backbone))
    with pytest.raises(BiasSetFormatError, match="kind 'chat' is not one of classification, generation"):
        BiasSet.from_bytes(st_save_numpy(tensors, metadata=meta | {"kind": "chat"}))
    with pytest.raises(BiasSetFormatError, match="'stop' must be a JSON list of strings"):
        BiasSet.from_bytes(st_save_numpy(tensors, metadata=meta | {"stop": '"\\n"'}))


def test_store_accepts_a_generation_set_on_a_backbone_that_generates(lm_backbone, tmp_path):
    spec = ServingSpec.of(lm_backbone)
    assert spec.generates
    data = generation_set(lm_backbone).to_bytes()
    assert validate(data, spec, max_bytes=MAX_BYTES, task="toy") == []
    store = open_store(tmp_path / "store", spec)
    store.put("toy", data)
    _, loaded = store.load("toy")
    assert loaded.is_generation and loaded.prompt_template == TEMPLATE


def test_store_refuses_a_generation_set_on_an_encoder_and_says_why(lm_backbone, encoder_backbone, tmp_path):
    spec = ServingSpec.of(encoder_backbone)
    assert not spec.generates
    data = generation_set(lm_backbone).to_bytes()
    problems = validate(data, spec, max_bytes=MAX_BYTES, task="toy")
    assert ("this is a generation bias set, and this server's backbone cannot generate text: it is an encoder "
            "(BertModel) with no causal language-model head; serve it with the decoder backbone it was trained on"
            ) in problems
    root = tmp_path / "store"
    store = open_store(root, spec)
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    with pytest.raises(InvalidBiasSet, match="cannot generate text"):
        store.put("toy", data)
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before


def _edit(tensors: dict | None = None, drop: tuple = (), **meta_changes):
    def build(bias_set):
        t, m = raw_parts(bias_set)
        t |= tensors or {}
        for k in drop:
            m.pop(k)
        return st_save_numpy(t, metadata=m | meta_changes)

    return build


@pytest.mark.parametrize(
    "edit, message",
    [
        (_edit(tensors={"head.out.weight": np.zeros((2, 32), np.float32)}),
         "unexpected tensor 'head.out.weight'; a generation bias set holds only delta (it has no classification head)"),
        (_edit(labels='["neg", "pos"]'),
         "metadata 'labels' belongs to a classification head, and a generation bias set has none; drop it"),
        (_edit(drop=("prompt_template",)),
         "metadata lacks 'prompt_template' (a generation bias set needs kind, prompt_template and stop)"),
        (_edit(prompt_template="no placeholder"),
         "metadata prompt_template: prompt template must hold {input} exactly once (where the input goes), it holds it 0 times"),
        (_edit(stop='["\\n", ""]'), "metadata stop: a stop sequence is empty"),
        (_edit(stop="not json"), "metadata 'stop' is not valid JSON"),
        (_edit(kind="chat"), "metadata kind 'chat' is not one of classification, generation"),
    ],
    ids=["head-tensor", "labels-key", "no-template", "template-without-placeholder", "empty-stop", "stop-not-json",
         "unknown-kind"],
)
def test_store_refuses_a_malformed_generation_set_naming_the_problem(lm_backbone, edit, message):
    problems = validate(edit(generation_set(lm_backbone)), ServingSpec.of(lm_backbone), max_bytes=MAX_BYTES, task="toy")
    assert any(p.startswith(message) for p in problems), problems


def test_a_classification_set_without_its_head_is_still_refused(lm_backbone):
    tensors, meta = raw_parts(generation_set(lm_backbone))
    meta = {k: v for k, v in meta.items() if k not in ("kind", "prompt_template", "stop")}
    meta |= {"labels": '["neg", "pos"]', "pooling": "last"}
    problems = validate(st_save_numpy(tensors, metadata=meta), ServingSpec.of(lm_backbone), max_bytes=MAX_BYTES, task="toy")
    assert "missing tensor 'head.out.weight'; a bias set holds exactly delta, head.out.weight, head.out.bias" in problems


def test_trained_generation_set_applies_to_the_backbone_it_came_from(tmp_path):
    from bitfit.bias_set import load_bias_set, save_bias_set
    from bitfit.generate import generate_texts
    from bitfit.lm import model_from_generation_set
    from bitfit.train import TrainConfig, to_bias_set, train
    from test_lm import toy_generation_data

    backbone, data = tiny_lm(), toy_generation_data()
    config = TrainConfig(objective="lm", epochs=1, batch_size=8, lr=3e-2, prompt_template=TEMPLATE, stop=["w95"], threads=1)
    result = train(backbone, data, config)
    path = save_bias_set(to_bias_set(backbone, data, result, config), tmp_path / "toy.safetensors")
    prompts = [TEMPLATE.replace("{input}", p.source) for p in data.dev]
    trained = generate_texts(result.model.eval(), backbone.tokenizer, prompts, stop=["w95"], max_new_tokens=6)

    fresh = tiny_lm()  # the same weights loaded again: the set's biases reproduce the trained model's outputs
    bias_set = load_bias_set(path)
    assert (bias_set.kind, bias_set.prompt_template, bias_set.stop, bias_set.task) == (GENERATION, TEMPLATE, ["w95"], "toy")
    assert bias_set.metrics["trainable"] == fresh.layout.size
    model = model_from_generation_set(fresh, bias_set)
    assert generate_texts(model, fresh.tokenizer, prompts, stop=bias_set.stop, max_new_tokens=6) == trained
    fresh.reset_biases()
    assert generate_texts(model, fresh.tokenizer, prompts, stop=["w95"], max_new_tokens=6) != trained
