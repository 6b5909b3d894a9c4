"""`bitfit train --objective lm` and `bitfit eval` on generation (BLEU, greedy and beam, the base model zero-shot),
end to end on a tiny Llama saved as a model directory and a tiny E2E-format folder; BLEU against sacrebleu
called directly; the LM head, and the fingerprint, the same whether the backbone is loaded as the base model or
taken from the causal-LM class."""

from __future__ import annotations

import json

import pytest
import torch

from bitfit.backbone import finish_backbone, load_backbone
from bitfit.bleu import corpus_bleu, reference_streams
from bitfit_cli.main import main
from conftest import TOLERANCES, tiny_config
from test_llm import tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEMPLATE = "w90 {input} w91"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny LlamaForCausalLM with a tied LM head, saved as SmolLM2's converted directory would be."""
    from transformers import LlamaForCausalLM

    config = tiny_config("llama")
    config.tie_word_embeddings, config.initializer_range = True, 0.3
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def e2e_dir(tmp_path_factory):
    """train/valid/test in the E2E one-line format; test inputs have 1-3 references each."""
    path = tmp_path_factory.mktemp("e2e")
    line = lambda i, j=0: f"w{i} w{i + 1}||w{i + 2 + j} w{i + 3}"  # noqa: E731
    (path / "train.txt").write_text("".join(line(i) + " \n" for i in range(1, 41)))
    (path / "valid.txt").write_text("".join(line(i) + " \n" for i in range(41, 49)))
    (path / "test.txt").write_text("".join(line(i, j) + " \n" for i in range(49, 55) for j in range(1 + i % 3)))
    return path


def run(capsys, *argv) -> str:
    code = main(list(map(str, argv)))
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


@pytest.fixture(scope="module")
def trained(model_dir, e2e_dir, tmp_path_factory):
    """One generation bias set trained by the CLI (BitFit), shared by the eval tests."""
    out = tmp_path_factory.mktemp("sets") / "toy.safetensors"
    assert main(["train", "--backbone", str(model_dir), "--objective", "lm", "--data", str(e2e_dir), "--task", "toy",
                 "--out", str(out), "--epochs", "2", "--batch-size", "8", "--lr", "0.03", "--prompt-template", TEMPLATE,
                 "--stop", "w95", "--threads", "1"]) == 0
    return out


def test_bleu_matches_sacrebleu_called_directly_with_a_variable_number_of_references():
    import sacrebleu

    outputs = ["The Eagle is a pub .", "a CHEAP place near the river", "Zizzi"]
    refs = [["The Eagle is a pub near the river .", "The Eagle pub ."], ["A cheap place by the river ."],
            ["Zizzi is a restaurant .", "Zizzi serves food .", "zizzi"]]
    score, signature = corpus_bleu(outputs, refs)
    want = sacrebleu.corpus_bleu(outputs, reference_streams(refs), lowercase=True, tokenize="13a")
    assert score.score == pytest.approx(want.score)
    assert 0 < score.score < 100 and "nrefs:var" in signature and "case:lc" in signature and "tok:13a" in signature
    # lowercase: case does not matter; every reference counts (dropping one lowers the score)
    assert corpus_bleu([o.upper() for o in outputs], refs)[0].score == pytest.approx(score.score)
    assert corpus_bleu(outputs, [r[:1] for r in refs])[0].score < score.score


def test_a_perfect_output_scores_100_against_any_of_its_references():
    assert corpus_bleu(["Zizzi is a restaurant in the city centre ."],
                       [["Something else entirely here .", "zizzi is a restaurant in the city centre ."]])[0].score == pytest.approx(100.0)


def test_train_writes_a_generation_set_with_the_template_and_stops(trained, capsys):
    from bitfit.bias_set import load_bias_set

    bias_set = load_bias_set(trained)
    assert bias_set.is_generation and bias_set.prompt_template == TEMPLATE and bias_set.stop == ["w95"]
    assert bias_set.train_args["objective"] == "lm" and bias_set.train_args["train_examples"] == 40


def test_eval_prints_test_bleu_of_what_it_generated(trained, model_dir, e2e_dir, capsys, tmp_path):
    from bitfit.bias_set import load_bias_set
    from bitfit.e2e import group_references, load_generation_data
    from bitfit.generate import generate_texts
    from bitfit.lm import model_from_generation_set, render_prompt

    report = tmp_path / "bleu.json"
    out = run(capsys, "eval", "--bias-set", trained, "--backbone", model_dir, "--data", e2e_dir, "--json", report)
    result = json.loads(report.read_text())
    assert f"toy test BLEU {result['bleu']:.2f} (greedy, 6 inputs, 12 references; sacrebleu nrefs:var" in out
    # the same outputs and score, computed here without the CLI
    grouped = group_references(load_generation_data(e2e_dir).test)
    backbone = load_backbone(model_dir)
    model = model_from_generation_set(backbone, load_bias_set(trained))
    outputs = generate_texts(model, backbone.tokenizer, [render_prompt(TEMPLATE, g.source) for g in grouped], stop=["w95"])
    assert result["outputs"] == outputs
    assert result["bleu"] == pytest.approx(corpus_bleu(outputs, [g.references for g in grouped])[0].score)


def test_eval_with_beams_and_on_the_base_model(trained, model_dir, e2e_dir, capsys):
    out = run(capsys, "eval", "--bias-set", trained, "--backbone", model_dir, "--data", e2e_dir, "--beams", "3", "--max-test", "4")
    assert "toy test BLEU" in out and "(beam 3, 4 inputs" in out
    out = run(capsys, "eval", "--base", "--backbone", model_dir, "--data", e2e_dir, "--prompt-template", TEMPLATE)
    assert "base model test BLEU" in out and "(greedy, 6 inputs" in out


@pytest.mark.parametrize("method", ["lora", "full"])
def test_lora_and_full_train_through_the_same_command_and_evaluate_from_their_checkpoint(method, model_dir, e2e_dir, capsys, tmp_path):
    out = tmp_path / f"{method}.safetensors"
    printed = run(capsys, "train", "--backbone", model_dir, "--objective", "lm", "--data", e2e_dir, "--task", "toy",
                  "--out", out, "--method", method, "--epochs", "1", "--max-steps", "3", "--batch-size", "8",
                  "--prompt-template", TEMPLATE, "--threads", "1")
    assert f"{method} checkpoint (not a bias set: it cannot be served)" in printed and ", 3 steps," in printed
    printed = run(capsys, "eval", "--bias-set", out, "--backbone", model_dir, "--data", e2e_dir, "--max-test", "3")
    assert "toy test BLEU" in printed and "(greedy, 3 inputs" in printed


@pytest.mark.parametrize(
    "argv, message",
    [(["eval", "--backbone", "{model}", "--data", "{data}"], "give --bias-set FILE (or --base"),
     (["eval", "--base", "--bias-set", "x", "--backbone", "{model}", "--data", "{data}"], "not both"),
     (["eval", "--base", "--backbone", "{model}", "--data", "{data}", "--beams", "0"], "--beams must be at least 1"),
     (["train", "--backbone", "{model}", "--objective", "lm", "--data", "{data}", "--task", "t", "--out", "x",
       "--prompt-template", "no placeholder"], "exactly once")],
    ids=["no-model", "base-and-set", "zero-beams", "template-without-input"],
)
def test_bad_generation_options_are_refused_with_a_message(argv, message, model_dir, e2e_dir, capsys):
    code = main([a.format(model=model_dir, data=e2e_dir) for a in argv])
    assert code == 2 and message in capsys.readouterr().err


def test_lm_head_and_fingerprint_are_the_causal_lm_classes_own(model_dir):
    """The backbone `load_backbone` gives (the base model) and the base model inside AutoModelForCausalLM have
    one fingerprint, and our tied head gives the causal-LM class's logits."""
    from transformers import AutoModelForCausalLM

    from bitfit.lm import language_model

    base = load_backbone(model_dir)
    causal = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    inner = finish_backbone(causal.model, base.tokenizer, str(model_dir))
    assert inner.layout.fingerprint == base.layout.fingerprint
    ids = torch.tensor([[5, 9, 13, 17, 21]])
    with torch.no_grad():
        ours = language_model(base)(ids)
        theirs = causal(input_ids=ids).logits  # the injected zero biases of `inner` are the causal model's too
    torch.testing.assert_close(ours, theirs, **TOLERANCES[torch.float32])


def test_an_untied_lm_head_is_read_from_the_model_directory_and_its_absence_is_named(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM, LlamaModel

    from bitfit.errors import BitfitError
    from bitfit.lm import generation_support, language_model

    config = tiny_config("llama")
    config.initializer_range = 0.3  # tie_word_embeddings stays False: a separate lm_head.weight
    torch.manual_seed(1)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "causal")
    LlamaModel(config).save_pretrained(tmp_path / "base-only")
    for name in ("causal", "base-only"):
        tiny_tokenizer().save_pretrained(tmp_path / name)
    backbone = load_backbone(tmp_path / "causal")
    ids = torch.tensor([[5, 9, 13]])
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "causal", dtype=torch.float32).eval()(input_ids=ids).logits
        torch.testing.assert_close(language_model(backbone)(ids), theirs, **TOLERANCES[torch.float32])
    base_only = load_backbone(tmp_path / "base-only")
    assert generation_support(base_only) == (False, f"its LM head is not tied to the embeddings and "
                                             f"{tmp_path / 'base-only'} holds no lm_head.weight")
    with pytest.raises(BitfitError, match="cannot generate text"):
        language_model(base_only)
