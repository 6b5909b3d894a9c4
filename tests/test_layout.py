"""Bias slots are found by module type on any architecture; the fingerprint pins a backbone."""

import pytest
import torch
from torch import nn

from bitfit.inject import inject_biases
from bitfit.layout import find_slots, fingerprint, layout_of
from conftest import tiny_model

ARCHS = ["bert", "roberta", "distilbert", "gpt2", "t5", "llama"]


def biased_modules(model):
    """Ground truth by hand: modules whose own `bias` is a Parameter, of the linear / norm kinds."""
    return [n for n, m in model.named_modules() if isinstance(m._parameters.get("bias"), nn.Parameter)]


@pytest.mark.parametrize("arch", ["bert", "roberta", "distilbert", "gpt2"], ids=str)
def test_find_slots_lists_every_biased_module_in_order(arch):
    model = tiny_model(arch)
    slots = find_slots(model)
    assert [s.path for s in slots] == biased_modules(model)
    assert slots[0].offset == 0
    for a, b in zip(slots, slots[1:]):
        assert b.offset == a.offset + a.size
    for s in slots:
        assert s.size == model.get_submodule(s.path).bias.numel()


def test_find_slots_ignores_gpt2_mask_buffer():
    model = tiny_model("gpt2")
    paths = {s.path for s in find_slots(model)}
    kinds = {s.kind for s in find_slots(model)}
    assert "conv1d" in kinds  # GPT-2's transposed linear layers are slots
    for name, buf in model.named_buffers():
        if name.endswith(".bias"):  # e.g. a causal mask buffer, if this transformers version keeps one
            assert name.rsplit(".", 1)[0] not in paths
    # a buffer named `bias` on a module is never a slot
    attn = model.h[0].attn
    attn.register_buffer("bias", torch.ones(4), persistent=False)
    assert "h.0.attn" not in {s.path for s in find_slots(model)}


def test_t5_relative_attention_bias_is_not_a_slot():
    model = tiny_model("t5")
    names = [n for n, _ in model.named_parameters()]
    assert any("relative_attention_bias" in n for n in names)
    assert find_slots(model) == ()  # T5 has no bias terms at all
    injected = inject_biases(model)
    assert not any("relative_attention_bias" in p for p in injected)
    assert all(s.kind == "injected" for s in find_slots(model))


def test_llama_gets_every_slot_injected():
    model = tiny_model("llama")
    assert find_slots(model) == ()
    injected = inject_biases(model)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert injected == linears and len(injected) == 2 * 7  # q k v o gate up down per layer
    slots = find_slots(model)
    assert [s.path for s in slots] == linears and {s.kind for s in slots} == {"injected"}


def test_bert_slot_kinds():
    slots = find_slots(tiny_model("bert"))
    kinds = {s.kind for s in slots}
    assert kinds == {"linear", "layer_norm"}


def test_fingerprint_changes_with_weights_and_slots_but_not_with_dtype():
    a, b = tiny_model("bert", seed=0), tiny_model("bert", seed=1)
    fa, fb = layout_of(a).fingerprint, layout_of(b).fingerprint
    assert fa != fb  # two checkpoints of one architecture
    assert layout_of(tiny_model("bert", seed=0)).fingerprint == fa  # deterministic
    with torch.no_grad():
        a.encoder.layer[0].output.dense.weight[0, 0] += 1e-3
    assert layout_of(a).fingerprint != fa  # any frozen weight
    c = tiny_model("llama")
    fc = layout_of(c).fingerprint
    inject_biases(c, ["q_proj"])
    assert layout_of(c).fingerprint != fc  # the slot list
    d = tiny_model("bert", seed=0)
    assert fingerprint(d.double(), find_slots(d)) == fa  # taken as float32


def test_gather_scatter_round_trip():
    model = tiny_model("bert")
    layout = layout_of(model)
    flat = layout.gather(model)
    assert flat.shape == (layout.size,)
    new = torch.randn(layout.size)
    layout.scatter(model, new)
    torch.testing.assert_close(layout.gather(model), new)
    with pytest.raises(ValueError, match="layout needs"):
        layout.scatter(model, torch.zeros(layout.size + 1))


@pytest.mark.slow
def test_minilm_has_50_slots_and_26112_bias_scalars(minilm_dir):
    from bitfit.backbone import load_backbone

    bb = load_backbone(minilm_dir)
    assert len(bb.layout.slots) == 50
    assert bb.layout.size == 26_112
    assert bb.injected == []
    assert bb.layout.describe() == {"linear": 6 * (4 * 384 + 1536 + 384) + 384, "layer_norm": 13 * 384}
    assert len(bb.layout.fingerprint) == 64
