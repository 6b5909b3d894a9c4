"""apply_bitfit(model) on transformers models with their own heads, as PEFT users call it, on tiny models built
from configs: what trains, that outputs do not move, the Trainer, and bias sets out of and back into a model.

The real MiniLM (the seed's printed line, the server's fingerprint, HTTP) is in test_apply_bitfit_minilm.py.
"""

from __future__ import annotations

import copy

import pytest
import torch

import bitfit
from bitfit.backbone import Backbone
from bitfit.errors import BackboneMismatch, BitfitError
from bitfit.evaluate import task_model_from_bias_set
from bitfit.hf_head import UnservableHead
from bitfit.inject import STATE, apply_bitfit, base_of, count_trainable, inject_biases
from bitfit.layout import find_slots, layout_of
from conftest import TOLERANCES, tiny_config

F32 = TOLERANCES[torch.float32]
HEADS = {  # everything outside base_model, trained in full
    "bert": {"classifier.weight", "classifier.bias"},
    "roberta": {"classifier.dense.weight", "classifier.dense.bias", "classifier.out_proj.weight",
                "classifier.out_proj.bias"},
    "gpt2": {"score.weight"},
    "t5": {"classification_head.dense.weight", "classification_head.dense.bias",
           "classification_head.out_proj.weight", "classification_head.out_proj.bias"},
    "llama": {"score.weight"},
    "bert-token": {"classifier.weight", "classifier.bias"},
    "llama-bare": set(),
}
MODELS = list(HEADS)
SERVABLE = {"bert": "pooler", "gpt2": "last", "llama": "last"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_hf(name: str, seed: int = 0, num_labels: int = 2):
    """A tiny randomly initialised transformers model of `name` (see HEADS), deterministic for a seed."""
    from transformers import (AutoModel, AutoModelForSequenceClassification, AutoModelForTokenClassification,
                              T5ForSequenceClassification)

    kind = name.split("-")[0]
    config = tiny_config(kind)
    config.num_labels, config.pad_token_id, config.decoder_start_token_id = num_labels, 0, 0  # ids below never are 0
    torch.manual_seed(seed)
    if name.endswith("-token"):
        model = AutoModelForTokenClassification.from_config(config)
    elif name.endswith("-bare"):
        model = AutoModel.from_config(config)
    elif kind == "t5":
        model = T5ForSequenceClassification(config)
    else:
        model = AutoModelForSequenceClassification.from_config(config)
    return model.eval()


def batch(name: str, n: int = 16, seq: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """Token ids >= 3 (no special token) and a learnable label: is the second token's id above 50?"""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 99, (n, seq), generator=g)
    if name.startswith("t5"):
        ids[:, -1] = 1  # T5's classifier reads the eos token, one per row
    labels = (ids > 50).long() if name.endswith("-token") else (ids[:, 1] > 50).long()
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**{k: v for k, v in inputs.items() if k != "labels"})
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).clone()


def trainable_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def prefix(model) -> str:
    base = base_of(model)
    return "" if base is model else f"{model.base_model_prefix}."


def perturb(model, seed: int = 3) -> None:
    """What training does to a BitFit model: move every trainable tensor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


# -- what trains -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS, ids=str)
def test_exactly_the_biases_and_the_whole_head_train(name, capsys):
    model = tiny_hf(name)
    assert apply_bitfit(model) is model
    base, pre = base_of(model), prefix(model)
    slot_biases = {f"{pre}{s.path}.bias" for s in find_slots(base)}
    assert trainable_names(model) == slot_biases | HEADS[name]
    assert slot_biases and all(n.endswith(".bias") for n in slot_biases)
    n_train, n_total, _ = count_trainable(model)
    assert n_train == layout_of(base).size + sum(p.numel() for n, p in model.named_parameters() if n in HEADS[name])
    assert capsys.readouterr().out == f"Trainable: {n_train:,} / {n_total:,} ({100 * n_train / n_total:.3f}%)\n"


@pytest.mark.parametrize("name", ["llama", "t5", "llama-bare"], ids=str)
def test_bias_less_backbones_get_zero_biases_and_the_head_gets_none(name):
    model = tiny_hf(name)
    apply_bitfit(model, verbose=False)
    base = base_of(model)
    injected = [p for p, m in base.named_modules() if getattr(m, "bitfit_injected", False)]
    assert injected == base.__dict__[STATE].injected
    assert injected and all(torch.count_nonzero(base.get_submodule(p).bias) == 0 for p in injected)
    heads = [m for p, m in model.named_modules() if p.startswith(("score", "classification_head"))]
    assert all(not getattr(m, "bitfit_injected", False) for m in heads)
    if name == "llama":
        assert model.score.bias is None
        assert len(injected) == 7 * model.config.num_hidden_layers


def test_t5_relative_attention_bias_stays_frozen():
    model = tiny_hf("t5")
    apply_bitfit(model, verbose=False)
    rel = [(n, p) for n, p in model.named_parameters() if "relative_attention_bias" in n]
    assert rel and not any(p.requires_grad for _, p in rel)


@pytest.mark.parametrize("name", MODELS, ids=str)
def test_outputs_are_bit_identical_after_apply_bitfit(name):
    model = tiny_hf(name)
    inputs = batch(name, n=3)
    before = logits(model, inputs)
    apply_bitfit(model, verbose=False)
    assert torch.equal(before, logits(model, inputs))


# -- the Trainer ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in MODELS if n != "llama-bare"], ids=str)
def test_trainer_steps_move_only_biases_and_head_and_lower_the_loss(name, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = apply_bitfit(tiny_hf(name), verbose=False)
    data = batch(name)
    rows = [{k: v[i] for k, v in data.items()} for i in range(len(data["labels"]))]
    before_params = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        loss_before = model.eval()(**data).loss.item()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=30, per_device_train_batch_size=8, learning_rate=1e-2,
                             report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True,
                             seed=0)
    Trainer(model=model, args=args, train_dataset=rows).train()
    with torch.no_grad():
        loss_after = model.eval()(**data).loss.item()
    trainable = trainable_names(model)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before_params[n])}
    assert moved <= trainable  # every frozen tensor bit for bit as it was
    assert HEADS[name] <= moved and moved - HEADS[name]  # the head and some backbone biases moved
    assert loss_after < 0.9 * loss_before, (loss_before, loss_after)


# -- bias sets out of a model and back in ---------------------------------------------------------------------


@pytest.mark.parametrize("name, num_labels", [("bert", 2), ("bert", 1), ("gpt2", 3), ("llama", 2)],
                         ids=["bert", "bert-regression", "gpt2", "llama"])
def test_save_then_load_into_a_fresh_model_gives_the_same_outputs(name, num_labels, tmp_path):
    inputs = batch(name, n=4)
    model = apply_bitfit(tiny_hf(name, num_labels=num_labels), verbose=False)
    perturb(model)
    labels = [] if num_labels == 1 else [f"c{i}" for i in range(num_labels)]
    path = bitfit.save_bias_set(model, tmp_path / "t.safetensors", task="t", labels=labels)
    fresh = tiny_hf(name, num_labels=num_labels)
    untrained = logits(fresh, inputs)
    assert bitfit.load_bias_set_into(fresh, path) is fresh
    want = logits(model, inputs)
    assert not torch.allclose(untrained, want, **F32)  # the check below could fail
    torch.testing.assert_close(logits(fresh, inputs), want, **F32)
    loaded = bitfit.load_bias_set(path)
    assert loaded.pooling == SERVABLE[name] and loaded.labels == labels and loaded.method == "bitfit"
    if labels:
        assert fresh.config.id2label == dict(enumerate(labels))


@pytest.mark.parametrize("name", list(SERVABLE), ids=str)
def test_saved_set_runs_on_the_bare_backbone_as_the_server_runs_it(name, tmp_path):
    # the server loads AutoModel (the base model), injects, and runs TaskHead: same fingerprint, same outputs
    model = tiny_hf(name)
    base = copy.deepcopy(base_of(model))  # the pre-trained backbone, as AutoModel.from_pretrained gives it
    apply_bitfit(model, verbose=False)
    perturb(model)
    bias_set = bitfit.bias_set_from_model(model, task="t", labels=["a", "b"])
    injected = inject_biases(base)
    backbone = Backbone(model=base.eval(), tokenizer=None, layout=layout_of(base), source="tiny", injected=injected)
    assert bias_set.fingerprint == backbone.layout.fingerprint
    inputs = batch(name, n=4)
    served = task_model_from_bias_set(backbone, bias_set)
    with torch.no_grad():
        got = served(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    torch.testing.assert_close(got, logits(model, inputs), **F32)


@pytest.mark.parametrize("name, why", [
    ("roberta", r"RobertaForSequenceClassification \(classifier.dense \(Linear\), classifier.out_proj .* not one"),
    ("t5", r"classification_head.dense .* is not one linear layer"),
    ("bert-token", r"applied to every token"),
    ("llama-bare", r"LlamaModel has no task head"),
], ids=["roberta-two-layers", "t5-two-layers", "token-classification", "bare-model"])
def test_save_refuses_heads_the_server_cannot_run_and_writes_nothing(name, why, tmp_path):
    model = apply_bitfit(tiny_hf(name), verbose=False)
    path = tmp_path / "t.safetensors"
    with pytest.raises(UnservableHead, match=why) as e:
        bitfit.save_bias_set(model, path, task="t")
    assert "a servable head is one linear layer reading a pooled vector" in str(e.value)
    assert not path.exists()


def test_save_without_apply_bitfit_says_to_call_it(tmp_path):
    with pytest.raises(BitfitError, match=r"not prepared with apply_bitfit\(model\)"):
        bitfit.save_bias_set(tiny_hf("bert"), tmp_path / "t.safetensors", task="t")


def test_save_refuses_a_model_whose_other_weights_trained(tmp_path):
    model = apply_bitfit(tiny_hf("bert"), verbose=False)
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.self.query.weight.add_(0.01)  # as full fine-tuning would
    with pytest.raises(BitfitError, match="weights other than biases changed"):
        bitfit.save_bias_set(model, tmp_path / "t.safetensors", task="t")


@pytest.mark.parametrize("labels, message", [
    (["a", "b", "c"], r"3 labels \['a', 'b', 'c'\] for a head with 2 outputs"),
    ([], r"labels=\[\] means regression \(one output\), but the head has 2 outputs"),
    (["a", "a"], "repeat a name"),
], ids=["too-many", "regression-on-two-outputs", "repeated"])
def test_save_refuses_labels_that_do_not_fit_the_head(labels, message, tmp_path):
    model = apply_bitfit(tiny_hf("bert"), verbose=False)
    with pytest.raises(BitfitError, match=message):
        bitfit.save_bias_set(model, tmp_path / "t.safetensors", task="t", labels=labels)


def test_labels_default_to_the_config_id2label(tmp_path):
    model = tiny_hf("bert")
    model.config.id2label = {0: "neg", 1: "pos"}
    apply_bitfit(model, verbose=False)
    assert bitfit.bias_set_from_model(model, task="t").labels == ["neg", "pos"]


def test_save_bias_set_of_a_bias_set_takes_no_model_fields(tmp_path):
    model = apply_bitfit(tiny_hf("bert"), verbose=False)
    bias_set = bitfit.bias_set_from_model(model, task="t", labels=["a", "b"])
    with pytest.raises(TypeError, match="takes no labels, task: the BiasSet carries them"):
        bitfit.save_bias_set(bias_set, tmp_path / "t.safetensors", task="t", labels=["a", "b"])
    assert bitfit.load_bias_set(bitfit.save_bias_set(bias_set, tmp_path / "t.safetensors")).task == "t"


def test_load_into_another_backbone_is_refused_and_leaves_the_model_as_it_was(tmp_path):
    model = apply_bitfit(tiny_hf("llama"), verbose=False)
    path = bitfit.save_bias_set(model, tmp_path / "t.safetensors", task="t", labels=["a", "b"])
    other = tiny_hf("llama", seed=1)  # other weights: another backbone
    inputs = batch("llama", n=3)
    before = logits(other, inputs)
    with pytest.raises(BackboneMismatch, match="only applies to the exact backbone"):
        bitfit.load_bias_set_into(other, path)
    assert not any(getattr(m, "bitfit_injected", False) for m in other.modules())  # the injection was undone
    assert STATE not in base_of(other).__dict__
    assert torch.equal(logits(other, inputs), before)


def test_load_refuses_a_head_of_another_shape(tmp_path):
    model = apply_bitfit(tiny_hf("bert"), verbose=False)
    path = bitfit.save_bias_set(model, tmp_path / "t.safetensors", task="t", labels=["a", "b"])
    with pytest.raises(BitfitError, match=r"head weight has shape \[2, 32\], this model's classifier \[3, 32\]"):
        bitfit.load_bias_set_into(tiny_hf("bert", num_labels=3), path)


# -- choosing slots and injection ---------------------------------------------------------------------------


@pytest.mark.parametrize("name, slots, inject, trained", [
    ("bert", "bq-bm2", None, {"query", "intermediate.dense"}),
    ("llama", "bq-bm2", None, {"q_proj", "gate_proj", "up_proj"}),
    ("llama", ["q_proj", "v_proj"], None, {"q_proj", "v_proj"}),
    ("llama", None, ["q_proj", "v_proj"], {"q_proj", "v_proj"}),
    ("bert", None, False, None),
], ids=["bert-bq-bm2", "llama-bq-bm2", "llama-train-q-v", "llama-inject-q-v", "bert-no-injection"])
def test_slot_choice_trains_only_those_biases(name, slots, inject, trained):
    model = apply_bitfit(tiny_hf(name), slots=slots, inject=inject, verbose=False)
    base, pre = base_of(model), prefix(model)
    all_slots = [s.path for s in find_slots(base)]
    if trained is None:
        want = set(all_slots)
    else:
        want = {p for p in all_slots if p.rsplit(".", 1)[-1] in trained or p.endswith(tuple(trained))}
    assert want and trainable_names(model) == {f"{pre}{p}.bias" for p in want} | HEADS[name]
    if inject is not None and inject is not False:
        assert {p.rsplit(".", 1)[-1] for p in all_slots} == set(inject)  # only those were injected


def test_bq_bm2_on_gpt2_trains_the_query_third_of_the_fused_projection():
    model = apply_bitfit(tiny_hf("gpt2"), slots="bq-bm2", verbose=False)
    h, layers = model.config.n_embd, model.config.n_layer
    n_train, _, _ = count_trainable(model)
    assert n_train == layers * (h + 4 * h) + 2 * h  # query third of c_attn, c_fc (4h), score (2 x h)


def test_unknown_slot_names_list_the_models_slots():
    with pytest.raises(BitfitError, match=r"no bias slot is named \['query'\]; .*'q_proj'"):
        apply_bitfit(tiny_hf("llama"), slots=["query"])
    with pytest.raises(BitfitError, match=r"slots='query' is not one of \('all', 'bq-bm2'\)"):
        apply_bitfit(tiny_hf("llama"), slots="query")


def test_apply_bitfit_twice_keeps_the_first_fingerprint_and_original_biases():
    model = apply_bitfit(tiny_hf("bert"), verbose=False)
    state = base_of(model).__dict__[STATE]
    perturb(model)
    apply_bitfit(model, verbose=False)  # e.g. after a restart of the training script on the same model object
    assert base_of(model).__dict__[STATE] is state
    assert not torch.equal(state.original, state.layout.gather(base_of(model)))


def test_a_refused_slot_choice_leaves_the_model_as_it_was():
    model = tiny_hf("llama")
    with pytest.raises(BitfitError, match=r"slots='bq-bm2' found \['query'\] of the query and MLP-intermediate"):
        apply_bitfit(model, inject=["q_proj"], slots="bq-bm2")  # no MLP projection got a slot
    assert not any(getattr(m, "bitfit_injected", False) for m in model.modules())
    assert STATE not in base_of(model).__dict__ and all(p.requires_grad for p in model.parameters())


def test_the_bitfit_train_form_takes_the_loaders_record_of_the_pretrained_biases():
    from bitfit.heads import TaskHead, TaskModel
    from bitfit.methods import prepare_bitfit

    base = tiny_hf("llama-bare")
    inject_biases(base)
    backbone = Backbone(model=base, tokenizer=None, layout=layout_of(base), source="tiny")
    backbone.layout.scatter(base, torch.ones(backbone.layout.size))  # as `bitfit train --init` does, before prepare
    prepare_bitfit(TaskModel(base, TaskHead(32, 2)), backbone, seed=0)
    state = base.__dict__[STATE]
    assert state.layout is backbone.layout and torch.equal(state.original, torch.zeros(backbone.layout.size))


def test_a_task_model_saves_and_loads_like_a_transformers_classifier(tmp_path):
    from bitfit.heads import TaskHead, TaskModel

    def task_model():
        torch.manual_seed(5)
        return TaskModel(tiny_hf("bert-bare"), TaskHead(32, 2, "mean")).eval()

    model = apply_bitfit(task_model(), verbose=False)
    perturb(model)
    path = bitfit.save_bias_set(model, tmp_path / "t.safetensors", task="t", labels=["a", "b"])
    assert bitfit.load_bias_set(path).pooling == "mean"
    fresh = bitfit.load_bias_set_into(task_model(), path)
    inputs = {k: v for k, v in batch("bert", n=3).items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs), model(**inputs), **F32)
