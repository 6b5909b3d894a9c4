"""Generation on the real SmolLM2-135M-Instruct with E2E data (slow, a few seconds each once the model is
converted): its tied LM head gives the causal-LM class's logits on the server's fingerprint; two BitFit steps
make a generation set that a SmolLM2 spec accepts and a MiniLM spec refuses with the reason; the shipped E2E set
validates, decodes with the KV cache as without, and names the restaurant it is asked about."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from bitfit.backbone import finish_backbone, load_backbone
from bitfit.bias_set import load_bias_set
from bitfit.e2e import group_references, load_generation_data
from bitfit.generate import StopCheck, greedy
from bitfit.lm import cut_at_stop, eos_ids, language_model, model_from_generation_set, prompt_ids
from bitfit.spec import ServingSpec
from bias_store import validate
from conftest import TOLERANCES
from test_e2e import E2E_DIR
from test_llm_real import missing_package

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]
SHIPPED = Path(__file__).resolve().parents[1] / "server" / "seed" / "smollm2" / "e2e.safetensors"


@pytest.fixture(scope="module")
def smollm2():
    reason = missing_package()
    if reason:
        pytest.skip(reason)
    return load_backbone("smollm2")


@pytest.fixture(scope="module")
def e2e():
    if not (E2E_DIR / "train.txt").is_file():
        pytest.skip(f"E2E data not found at {E2E_DIR}")
    return load_generation_data(E2E_DIR, "e2e")


def test_tied_lm_head_gives_the_causal_lm_logits_and_the_fingerprint_is_the_servers(smollm2):
    from transformers import AutoModelForCausalLM

    assert smollm2.model.config.tie_word_embeddings
    causal = AutoModelForCausalLM.from_pretrained(smollm2.source, dtype=torch.float32).eval()
    inner = finish_backbone(causal.model, smollm2.tokenizer, smollm2.source)
    assert inner.layout.fingerprint == smollm2.layout.fingerprint  # a set trained here applies to the server's backbone
    ids = smollm2.tokenizer(["name : The Eagle | Type : pub"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(language_model(smollm2)(ids), causal(input_ids=ids).logits, **TOLERANCES[torch.float32])


def test_two_bitfit_steps_give_a_generation_set_smollm2_serves_and_minilm_refuses(smollm2, e2e, minilm_backbone):
    from bitfit.train import TrainConfig, to_bias_set, train

    backbone = copy.deepcopy(smollm2)
    config = TrainConfig(objective="lm", epochs=1, batch_size=2, max_train=4, max_dev=2, lr=3e-3, threads=1)
    result = train(backbone, e2e, config)
    assert result.steps == 2 and result.trainable == 155_520
    data = to_bias_set(backbone, e2e, result, config).to_bytes()
    assert validate(data, ServingSpec.of(smollm2), max_bytes=1 << 24, task="e2e") == []
    problems = validate(data, ServingSpec.of(minilm_backbone), max_bytes=1 << 24, task="e2e")
    assert any("cannot generate text: it is an encoder (BertModel)" in p for p in problems), problems


def test_shipped_e2e_set_validates_and_greedy_with_cache_equals_recomputing(smollm2, e2e):
    data = SHIPPED.read_bytes()
    assert validate(data, ServingSpec.of(smollm2), max_bytes=1 << 24, task="e2e") == []
    bias_set = load_bias_set(SHIPPED)
    backbone = copy.deepcopy(smollm2)  # the set's biases are written in place
    model = model_from_generation_set(backbone, bias_set)
    tok = backbone.tokenizer
    grouped = group_references(e2e.test)[:2]
    prompts = prompt_ids(tok, bias_set.prompt_template, [g.source for g in grouped])
    check = StopCheck(eos_ids(tok), bias_set.stop, lambda t: tok.decode(t, skip_special_tokens=True))
    cached = greedy(model, prompts, max_new_tokens=32, check=check, pad_id=tok.pad_token_id)  # the two, left-padded
    # the first one alone, recomputing the whole sequence at every step (no cache, no padding)
    recomputed = greedy(model, prompts[:1], max_new_tokens=8, check=check, pad_id=tok.pad_token_id, use_cache=False)
    assert recomputed[0] == cached[0][:8]
    for g, tokens in zip(grouped, cached):
        text = cut_at_stop(tok.decode(tokens, skip_special_tokens=True), bias_set.stop)[0]
        name = g.source.split("|")[0].split(":", 1)[1].strip()  # "name : Blue Spice | ..." -> "Blue Spice"
        assert name in text and "\n" not in text, (g.source, text)
