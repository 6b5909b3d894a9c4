"""apply_bitfit on bias-less LLMs: the Llama-2-7B counts from its config on the meta device (no weights), and
`bitfit train` against apply_bitfit on one tiny Llama directory (the same count; each one's bias set in the other)."""

from __future__ import annotations

import re

import pytest
import torch

import bitfit
from bitfit.inject import count_trainable
from conftest import TOLERANCES, tiny_model, write_rows

F32 = TOLERANCES[torch.float32]
LAYERS, H, I, VOCAB = 32, 4096, 11008, 32000  # Llama-2-7B
PER_LAYER = {"q_proj": H, "k_proj": H, "v_proj": H, "o_proj": H, "gate_proj": I, "up_proj": I, "down_proj": H}
SEED_CLAIM = 6.6e6  # the seed's "~6.6M / 7B (0.09%)"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster, and the shared machine's other core stays free
    yield
    torch.set_num_threads(before)


def llama2_7b(cls_name: str):
    import transformers
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=LAYERS, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=VOCAB, num_labels=2)
    with torch.device("meta"):  # shapes only: 6.7 B parameters and no byte of weights
        return getattr(transformers, cls_name)(config)


# (apply_bitfit options, projections whose biases train); a 2-label `score` adds 2 x 4096 on the classifier
CHOICES = {
    "all-seven": ({}, list(PER_LAYER)),
    "q-v": ({"slots": ["q_proj", "v_proj"]}, ["q_proj", "v_proj"]),
    "inject-q-v-only": ({"inject": ["q_proj", "v_proj"]}, ["q_proj", "v_proj"]),
    "bq-bm2-query-and-mlp-intermediate": ({"slots": "bq-bm2"}, ["q_proj", "gate_proj", "up_proj"]),
    "q-and-up": ({"slots": ["q_proj", "up_proj"]}, ["q_proj", "up_proj"]),
}


@pytest.mark.parametrize("cls_name, head", [("LlamaForCausalLM", 0), ("LlamaForSequenceClassification", 2 * H)],
                         ids=["causal-lm", "seq-cls"])
@pytest.mark.parametrize("choice", list(CHOICES), ids=str)
def test_llama2_7b_trainable_counts_on_the_meta_device(choice, cls_name, head, capsys):
    options, trained = CHOICES[choice]
    model = bitfit.apply_bitfit(llama2_7b(cls_name), **options)
    n_train, n_total, _ = count_trainable(model)
    assert n_train == LAYERS * sum(PER_LAYER[p] for p in trained) + head  # lm_head is pre-trained: it stays frozen
    injected = options.get("inject", list(PER_LAYER))
    plain = 6_738_415_616 if cls_name == "LlamaForCausalLM" else 6_607_343_616 + head
    assert n_total == plain + LAYERS * sum(PER_LAYER[p] for p in injected)
    assert capsys.readouterr().out.startswith(f"Trainable: {n_train:,} / {n_total:,} (")


def test_no_slot_choice_reaches_the_seeds_6_6_million():
    # every projection's output gets one bias: 32 x (4 x 4096 + 2 x 11008 + 4096) = 1,359,872 is the ceiling
    model = bitfit.apply_bitfit(llama2_7b("LlamaForCausalLM"), verbose=False)
    assert count_trainable(model)[0] == 1_359_872 < SEED_CLAIM / 4


def test_meta_model_can_be_counted_but_not_saved(tmp_path):
    model = bitfit.apply_bitfit(llama2_7b("LlamaForSequenceClassification"), verbose=False)
    with pytest.raises(bitfit.BitfitError, match="meta device"):
        bitfit.save_bias_set(model, tmp_path / "t.safetensors", task="t")


# -- bitfit train and apply_bitfit on one tiny Llama directory --------------------------------------------------


def tiny_tokenizer():
    """Word level over the tiny Llama's 99 ids, with an eos and no pad token, as decoders ship."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i + 2 for i in range(1, 97)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def trained(llama_dir, tmp_path_factory):
    """`bitfit train` on the tiny Llama: its printed trainable count and the bias set it wrote."""
    import contextlib
    import io

    from bitfit_cli.main import main

    tmp = tmp_path_factory.mktemp("train")
    rows = [[" ".join(f"w{(7 * i + j) % 96 + 1}" for j in range(2 + i % 5)), str(i % 2)] for i in range(24)]
    data = write_rows(tmp / "toy.csv", ["text", "label"], rows, sep=",")
    out, printed = tmp / "toy.safetensors", io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["train", "--data", str(data), "--task", "toy", "--out", str(out), "--backbone", str(llama_dir),
                     "--epochs", "1", "--batch-size", "8", "--lr", "1e-2"]) == 0
    return printed.getvalue(), out


def hf_classifier(llama_dir):
    from transformers import LlamaForSequenceClassification

    model = LlamaForSequenceClassification.from_pretrained(llama_dir, num_labels=2, dtype=torch.float32)
    model.config.pad_token_id = tiny_tokenizer().eos_token_id  # as load_backbone pads a decoder: with eos
    return model.eval()


def test_bitfit_train_and_apply_bitfit_report_the_same_count_on_a_bias_less_llm(llama_dir, trained, capsys):
    line = re.search(r"trainable ([\d,]+) / ([\d,]+)", trained[0])
    cli_train, cli_total = (int(x.replace(",", "")) for x in line.groups())
    bitfit.apply_bitfit(hf_classifier(llama_dir))
    ours = re.fullmatch(r"Trainable: ([\d,]+) / ([\d,]+) \([\d.]+%\)\n", capsys.readouterr().out)
    train, total = (int(x.replace(",", "")) for x in ours.groups())
    # the same injected biases; the one difference is the head's bias: bitfit train's head has one per label,
    # LlamaForSequenceClassification's `score` has none
    assert (cli_train - train, cli_total - total) == (2, 2)


def test_bitfit_train_bias_set_loads_into_llama_for_sequence_classification(llama_dir, trained):
    from bitfit.backbone import load_backbone
    from bitfit.evaluate import task_model_from_bias_set

    bias_set = bitfit.load_bias_set(trained[1])
    model = bitfit.load_bias_set_into(hf_classifier(llama_dir), trained[1])
    assert model.score.bias is not None  # bitfit train's head has a bias, which `score` gets to match it
    backbone = load_backbone(llama_dir)
    texts = ["w1 w2 w3", "w4 w5 w6 w7 w8", "w9"]
    enc = backbone.encode(texts)  # right-padded with eos, as the server pads
    with torch.no_grad():
        want = task_model_from_bias_set(backbone, bias_set)(**enc)
        got = model(**enc).logits
    torch.testing.assert_close(got, want, **F32)


def test_apply_bitfit_bias_set_of_a_llama_classifier_matches_the_bitfit_train_backbone(llama_dir):
    from bitfit.backbone import load_backbone

    model = bitfit.apply_bitfit(hf_classifier(llama_dir), verbose=False)
    bias_set = bitfit.bias_set_from_model(model, task="t", labels=["a", "b"])
    backbone = load_backbone(llama_dir)  # what `bitfit serve --backbone DIR` loads
    assert (bias_set.fingerprint, bias_set.delta.numel()) == (backbone.layout.fingerprint, backbone.layout.size)
    assert sorted(bias_set.injected) == sorted(backbone.injected)
