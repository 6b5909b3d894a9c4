"""Generation on a tiny random Llama (tied LM head, as SmolLM2's): the prompt template and stop sequences, the
LM loss on reference tokens only, greedy and beam decoding with a KV cache, BLEU, and training an lm objective
through the same loop as classification (BitFit, LoRA, full).

The generation bias set and its validation are in test_lm_bias_set.py; the real SmolLM2 in test_lm_real.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bitfit.backbone import finish_backbone
from bitfit.e2e import GenerationData, Pair
from bitfit.generate import StopCheck, beam_search, decode_step, generate_texts, greedy, left_pad, positions_of, prefill
from bitfit.lm import (IGNORE, cut_at_stop, encode_pairs, language_model, lm_loss, render_prompt, stop_problems,
                       template_problems)
from bitfit.train import TrainConfig, train
from conftest import TOLERANCES, tiny_config
from test_llm import tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

F32 = TOLERANCES[torch.float32]
TEMPLATE = "w90 {input} w91"
EOS = 2  # "</s>" of the tiny tokenizer


def tiny_lm(seed: int = 0):
    """conftest's tiny Llama with a tied LM head, as SmolLM2 (logits = hidden @ embed_tokens.weight.T).

    Initialised wider than the default 0.02: at 0.02 a tied random model repeats one token forever, so a
    decoding bug could not show; at 0.3 its greedy outputs vary from step to step and from row to row."""
    from transformers import AutoModel

    config = tiny_config("llama")
    config.tie_word_embeddings, config.initializer_range = True, 0.3
    torch.manual_seed(seed)
    return finish_backbone(AutoModel.from_config(config).eval(), tiny_tokenizer(), "tiny-llama")


def ids(*words: str) -> list[int]:
    return tiny_tokenizer()(" ".join(words), add_special_tokens=False)["input_ids"]


PROMPTS = [ids("w90", "w1", "w2", "w3", "w91"), ids("w90", "w4", "w91"), ids("w7", "w8", "w9", "w10", "w11", "w12", "w13")]


# -- prompt template and stop sequences ---------------------------------------------------------------


def test_template_puts_the_input_at_its_placeholder_and_leaves_braces_in_the_input_alone():
    assert render_prompt("Describe: {input}\nSentence:", "name : {x} | food : {input}") == \
        "Describe: name : {x} | food : {input}\nSentence:"


@pytest.mark.parametrize("template, ok", [("{input}", True), ("no placeholder", False), ("{input} and {input}", False),
                                          (None, False)], ids=["one", "none", "two", "not-a-string"])
def test_template_needs_exactly_one_placeholder(template, ok):
    assert (template_problems(template) == []) is ok


@pytest.mark.parametrize(
    "stop, problem",
    [(["\n"], None), ([], None), (["\n", ""], "empty"), (["a", "b", "c", "d", "e"], "at most 4"), ("\n", "list of strings"),
     (["x" * 65], "longer than 64")],
    ids=["newline", "none", "empty-one", "too-many", "not-a-list", "too-long"],
)
def test_stop_sequences_are_checked(stop, problem):
    problems = stop_problems(stop)
    assert problems == [] if problem is None else any(problem in p for p in problems)


@pytest.mark.parametrize(
    "text, stop, want",
    [("A pub .\nMore", ["\n"], ("A pub .", True)), ("A pub . END x\nz", ["\n", " END"], ("A pub .", True)),
     ("A pub .", ["\n"], ("A pub .", False)), ("A pub .", [], ("A pub .", False))],
    ids=["newline", "earliest-of-two", "no-stop-in-text", "no-stops"],
)
def test_text_is_cut_before_the_earliest_stop_sequence(text, stop, want):
    assert cut_at_stop(text, stop) == want


# -- the loss: reference tokens only ------------------------------------------------------------------


PAIRS = [Pair("w1 w2 w3", "w4 w5"), Pair("w6", "w7 w8 w9 w10")]


def test_labels_are_the_target_and_eos_and_ignore_the_prompt_and_padding():
    batch = encode_pairs(tiny_tokenizer(), TEMPLATE, PAIRS, max_length=64)
    prompt0, prompt1 = ids("w90", "w1", "w2", "w3", "w91"), ids("w90", "w6", "w91")
    width = batch["input_ids"].shape[1]
    assert batch["input_ids"][0].tolist() == prompt0 + ids("w4", "w5") + [EOS] + [EOS] * (width - len(prompt0) - 3)
    assert batch["labels"][0].tolist()[: len(prompt0) + 3] == [IGNORE] * len(prompt0) + ids("w4", "w5") + [EOS]
    assert batch["labels"][1].tolist() == [IGNORE] * len(prompt1) + ids("w7", "w8", "w9", "w10") + [EOS]
    assert batch["attention_mask"].sum(1).tolist() == [len(prompt0) + 3, len(prompt1) + 5]
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()


def test_a_long_pair_loses_the_end_of_its_target_never_its_prompt():
    batch = encode_pairs(tiny_tokenizer(), TEMPLATE, [Pair("w1 w2 w3", "w4 w5 w6 w7")], max_length=7)
    assert batch["input_ids"][0].tolist() == ids("w90", "w1", "w2", "w3", "w91", "w4", "w5")


def test_loss_is_the_mean_cross_entropy_of_the_target_tokens_from_full_logits():
    model = language_model(tiny_lm())
    batch = encode_pairs(tiny_tokenizer(), TEMPLATE, PAIRS, max_length=64)
    logits = model(batch["input_ids"], batch["attention_mask"])[:, :-1]  # (b, t-1, vocab), every position
    labels = batch["labels"][:, 1:]
    want = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)
    torch.testing.assert_close(lm_loss(model, batch), want, **F32)


def test_positions_that_predict_prompt_or_padding_get_no_gradient():
    model = language_model(tiny_lm())
    batch = encode_pairs(tiny_tokenizer(), TEMPLATE, PAIRS, max_length=64)
    seen = {}

    def keep(module, args, out):
        out.retain_grad()
        seen["hidden"] = out

    handle = model.backbone.norm.register_forward_hook(keep)  # the final norm's output is last_hidden_state
    lm_loss(model, batch).backward()
    handle.remove()
    grad = seen["hidden"].grad.abs().sum(-1)  # (b, t)
    predicts_target = torch.zeros_like(batch["labels"], dtype=torch.bool)
    predicts_target[:, :-1] = batch["labels"][:, 1:] != IGNORE
    assert (grad[~predicts_target] == 0).all()
    assert (grad[predicts_target] > 0).all()


# -- decoding -----------------------------------------------------------------------------------------


def no_stop() -> StopCheck:
    return StopCheck(eos=[])


def test_one_decode_step_on_the_cache_gives_the_full_forward_logits_of_the_new_token():
    model = language_model(tiny_lm()).eval()
    input_ids, mask = left_pad(PROMPTS, pad_id=EOS)
    _, cache = prefill(model, input_ids, mask)
    new = torch.tensor([11, 12, 13])
    mask2 = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], 1)
    got = decode_step(model, new, cache, mask2, positions_of(mask2)[:, -1])
    with torch.no_grad():
        full = model.logits(model.backbone(input_ids=torch.cat([input_ids, new[:, None]], 1), attention_mask=mask2,
                                           position_ids=positions_of(mask2), use_cache=False).last_hidden_state[:, -1])
    torch.testing.assert_close(got, full, **F32)


def test_greedy_with_the_kv_cache_is_token_identical_to_recomputing_every_step():
    model = language_model(tiny_lm()).eval()
    free = greedy(model, PROMPTS, max_new_tokens=12, check=no_stop(), pad_id=EOS)
    # an eos that row 0 emits at its 4th step (and not before) makes rows leave the batch at different steps
    eos = free[0][3]
    assert eos not in free[0][:3]
    check = StopCheck(eos=[eos])
    cached = greedy(model, PROMPTS, max_new_tokens=12, check=check, pad_id=EOS)
    recomputed = greedy(model, PROMPTS, max_new_tokens=12, check=check, pad_id=EOS, use_cache=False)
    assert cached == recomputed
    assert cached[0] == free[0][:3] and all(len(r) == 12 for r, f in zip(cached, free) if eos not in f)
    assert len({tuple(r) for r in free}) == 3  # the rows really differ


def test_a_left_padded_prompt_decodes_as_that_prompt_alone():
    model = language_model(tiny_lm()).eval()
    batch = greedy(model, PROMPTS, max_new_tokens=10, check=no_stop(), pad_id=EOS)
    for prompt, row in zip(PROMPTS, batch):
        assert greedy(model, [prompt], max_new_tokens=10, check=no_stop(), pad_id=EOS) == [row]


def test_beam_of_width_one_is_greedy():
    model = language_model(tiny_lm()).eval()
    free = greedy(model, PROMPTS, max_new_tokens=10, check=no_stop(), pad_id=EOS)
    check = StopCheck(eos=[free[1][5]])  # one row ends early on eos, the others run to the length limit
    assert beam_search(model, PROMPTS, beams=1, max_new_tokens=10, check=check, pad_id=EOS) == \
        greedy(model, PROMPTS, max_new_tokens=10, check=check, pad_id=EOS)


def test_beam_as_wide_as_the_vocabulary_finds_the_most_likely_two_token_continuation():
    model = language_model(tiny_lm()).eval()
    prompt = PROMPTS[0]
    vocab = model.backbone.config.vocab_size
    with torch.no_grad():  # every (t1, t2): log p(t1 | prompt) + log p(t2 | prompt, t1)
        first = torch.log_softmax(model(torch.tensor([prompt]))[0, -1], -1)
        rows = torch.tensor([prompt + [t] for t in range(vocab)])
        second = torch.log_softmax(model(rows)[:, -1], -1)
    best = int((first[:, None] + second).argmax())
    want = [best // vocab, best % vocab]
    got = beam_search(model, [prompt, PROMPTS[1]], beams=vocab, max_new_tokens=2, check=no_stop(), pad_id=EOS)
    assert got[0] == want


def test_eos_ends_a_beam_hypothesis_and_is_not_part_of_its_tokens():
    model = language_model(tiny_lm()).eval()
    free = greedy(model, PROMPTS[:1], max_new_tokens=6, check=no_stop(), pad_id=EOS)[0]
    out = beam_search(model, PROMPTS[:1], beams=3, max_new_tokens=6, check=StopCheck(eos=[free[0]]), pad_id=EOS)[0]
    assert free[0] not in out


def test_a_stop_sequence_ends_generation_and_the_text_is_cut_before_it():
    backbone = tiny_lm()
    model = language_model(backbone).eval()
    tok = backbone.tokenizer
    text = lambda t: tok.decode(t, skip_special_tokens=True)  # noqa: E731
    free = greedy(model, PROMPTS[:1], max_new_tokens=8, check=no_stop(), pad_id=EOS)[0]
    stop_word = tok.convert_ids_to_tokens(free[4])
    assert stop_word not in text(free[:4]).split()
    check = StopCheck(eos=[], stop=[" " + stop_word], decode=text)
    assert greedy(model, PROMPTS[:1], max_new_tokens=8, check=check, pad_id=EOS)[0] == free[:5]
    out = generate_texts(model, tok, [tok.decode(PROMPTS[0])], stop=[" " + stop_word], max_new_tokens=8)
    assert out == [text(free[:4])]


def test_generate_texts_keeps_the_order_of_its_prompts():
    backbone = tiny_lm()
    model = language_model(backbone).eval()
    prompts = [backbone.tokenizer.decode(p) for p in PROMPTS]
    together = generate_texts(model, backbone.tokenizer, prompts, max_new_tokens=5, batch_size=2)
    assert together == [generate_texts(model, backbone.tokenizer, [p], max_new_tokens=5)[0] for p in prompts]
    assert together == generate_texts(model, backbone.tokenizer, prompts, max_new_tokens=5, beams=1, batch_size=3)


# -- training with the lm objective -------------------------------------------------------------------


def toy_generation_data() -> GenerationData:
    """Targets are a fixed function of the input (the next two words), so a model can learn them."""
    pairs = [Pair(f"w{i} w{i + 1}", f"w{i + 2} w{i + 3}") for i in range(1, 60)]
    return GenerationData("toy", pairs[:48], pairs[48:])


@pytest.mark.parametrize("method", ["bitfit", "lora", "full"])
def test_lm_objective_trains_each_method_through_the_same_loop(method):
    backbone = tiny_lm()
    config = TrainConfig(method=method, objective="lm", epochs=3, batch_size=8, lr={"bitfit": 3e-2, "lora": 1e-2,
                         "full": 3e-3}[method], prompt_template=TEMPLATE, stop=["w95"], threads=1)
    result = train(backbone, toy_generation_data(), config)
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0] - 0.05, losses
    assert result.steps == 18
    if method == "bitfit":
        assert result.trainable == backbone.layout.size  # the biases alone: the LM head is the frozen embeddings
        assert torch.count_nonzero(backbone.layout.gather(backbone.model)) > 0


def test_max_steps_stops_training_and_ends_the_schedule_there():
    result = train(tiny_lm(), toy_generation_data(), TrainConfig(objective="lm", epochs=5, batch_size=8, max_steps=4,
                                                               lr=1e-2, prompt_template=TEMPLATE, threads=1))
    assert result.steps == 4 and len(result.history) == 1


def test_head_only_method_is_refused_for_lm_because_nothing_would_train():
    from bitfit.errors import BitfitError

    with pytest.raises(BitfitError, match="trains nothing"):
        train(tiny_lm(), toy_generation_data(), TrainConfig(method="head", objective="lm", epochs=1, prompt_template=TEMPLATE))


@pytest.mark.parametrize("bad, message", [({"objective": "gen"}, "unknown objective"), ({"max_steps": 0}, "at least 1")],
                         ids=["objective", "max-steps"])
def test_bad_training_options_are_refused_before_anything_loads(bad, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**bad)


def test_a_template_without_placeholder_is_refused_before_training():
    from bitfit.errors import DataError

    with pytest.raises(DataError, match="exactly once"):
        train(tiny_lm(), toy_generation_data(), TrainConfig(objective="lm", prompt_template="no input here"))
