"""Injected zero biases leave outputs bit-for-bit unchanged; apply_bitfit freezes the rest."""

import pytest
import torch

from bitfit.errors import BitfitError
from bitfit.heads import TaskHead
from bitfit.inject import apply_bitfit, count_trainable, inject_biases
from conftest import tiny_inputs, tiny_model


@pytest.mark.parametrize("arch", ["llama", "t5", "gpt2", "bert"], ids=str)
def test_outputs_bit_identical_after_injection(arch):
    model = tiny_model(arch)
    inputs = tiny_inputs()
    with torch.no_grad():
        before = model(**inputs).last_hidden_state.clone()
        injected = inject_biases(model)
        after = model(**inputs).last_hidden_state
    assert torch.equal(before, after)
    if arch in ("llama", "t5"):
        assert injected  # bias-less models do get slots
    else:
        assert injected == []  # models with biases get nothing new


def test_inject_only_named_targets():
    model = tiny_model("llama")
    injected = inject_biases(model, ["q_proj", "v_proj"])
    assert injected and all(p.endswith(("q_proj", "v_proj")) for p in injected)
    assert len(injected) == 4
    assert inject_biases(model, ["q_proj"]) == []  # idempotent: they have biases now


def test_inject_unknown_target_names_the_candidates():
    with pytest.raises(BitfitError, match=r"no linear layer is named \['query'\].*candidates are .*q_proj"):
        inject_biases(tiny_model("llama"), ["query"])


def test_apply_bitfit_leaves_only_biases_and_head_trainable():
    model = tiny_model("bert")
    head = TaskHead(32, 2)
    assert apply_bitfit(model, head, verbose=False) is model
    n_train, n_total, pct = count_trainable(model, head)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".bias") for n in trainable)
    assert all(p.requires_grad for p in head.parameters())
    bias_total = sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    assert n_train == bias_total + 32 * 2 + 2
    assert n_total == sum(p.numel() for p in model.parameters()) + 32 * 2 + 2
    assert pct == pytest.approx(100 * n_train / n_total)


def test_apply_bitfit_on_bias_less_model_without_injection_asks_for_it():
    with pytest.raises(BitfitError, match="no bias slots .* pass inject=True"):
        apply_bitfit(tiny_model("llama"), inject=False)


def test_apply_bitfit_with_a_separate_head_injects_nothing_by_default():
    # the (backbone, head) form gets its backbone from load_backbone, which injected its choice already
    model = tiny_model("llama")
    inject_biases(model, ["q_proj"])
    apply_bitfit(model, TaskHead(32, 2), verbose=False)
    injected = {p.rsplit(".", 1)[-1] for p, m in model.named_modules() if getattr(m, "bitfit_injected", False)}
    assert injected == {"q_proj"}
