"""Banked-bias layers: each slot module wrapped once, no hooks; a gather batch equals every row run alone with its
own biases written in, for every slot kind (linear, GPT-2's Conv1D, layer norm, injected, channels-first conv and
group norm). The engine-level tests (test_engine.py) run the same layers on the real MiniLM, and under torch.compile."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bitfit.inject import inject_biases
from bitfit.layout import layout_of
from bitfit.spec import ServingSpec
from server.runtime.bank import BiasBank
from server.runtime.layers import (
    BankedBias,
    BankedConv,
    BankedConv1D,
    BankedGroupNorm,
    BankedLayerNorm,
    BankedLinear,
    BatchMapping,
    needs_zero_flat,
    wrap_slots,
)

from conftest import TOLERANCES, tiny_inputs, tiny_model

F32 = TOLERANCES[torch.float32]


class ConvNet(nn.Module):
    """Channels-first slots: a Conv1d and a GroupNorm see (b, channels, length); then a layer norm and a linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 6, 3, padding=1)
        self.norm = nn.GroupNorm(2, 6)
        self.ln = nn.LayerNorm(6)
        self.out = nn.Linear(6, 5)

    def forward(self, x):  # (b, 4, t)
        h = self.norm(self.conv(x)).transpose(1, 2)  # (b, t, 6)
        return self.out(self.ln(h))  # (b, t, 5)


class Conv2dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):  # (b, 3, h, w)
        return self.conv(x)


def hf(kind: str, inject: bool = False):
    def build():
        model = tiny_model(kind)
        if inject:
            inject_biases(model)
        return model, tiny_inputs(batch=3, seq=7)

    return build


def conv1d():
    torch.manual_seed(0)
    return ConvNet().eval(), {"x": torch.randn(3, 4, 9)}


def conv2d():
    torch.manual_seed(0)
    return Conv2dNet().eval(), {"x": torch.randn(3, 3, 5, 5)}


CASES = {
    "bert (linear, layer norm)": (hf("bert"), {BankedLinear, BankedLayerNorm}),
    "gpt2 (Conv1D)": (hf("gpt2"), {BankedConv1D, BankedLayerNorm}),
    "llama (injected)": (hf("llama", inject=True), {BankedLinear}),
    "t5 (injected, relative attention bias untouched)": (hf("t5", inject=True), {BankedLinear}),
    "conv1d and group norm (channels first)": (conv1d, {BankedConv, BankedGroupNorm, BankedLayerNorm, BankedLinear}),
    "conv2d (channels first)": (conv2d, {BankedConv}),
}


def output(out) -> torch.Tensor:
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out


def setup(build):
    """A model, its inputs, a bank of three random tasks, and a wrapped copy of the model reading that bank."""
    model, inputs = build()
    for p in model.parameters():
        p.requires_grad_(False)
    layout = layout_of(model)
    original = layout.gather(model)
    spec = ServingSpec.for_layout(layout, hidden=8)
    bank = BiasBank(spec, original, capacity=3)
    g = torch.Generator().manual_seed(3)
    for r in range(3):
        bank.rows[r] = original + torch.randn(layout.size, generator=g) * 0.5
    wrapped, mapping = copy.deepcopy(model), BatchMapping()
    layers = wrap_slots(wrapped, layout.slots, bank, mapping)
    return model, inputs, layout, bank, wrapped, mapping, layers


def alone(model, layout, bank, inputs, rows) -> torch.Tensor:
    """Each input through the plain model with its row's biases written in."""
    outs = []
    with torch.no_grad():
        for i, r in enumerate(rows):
            layout.scatter(model, bank.rows[r])
            outs.append(output(model(**{k: v[i : i + 1] for k, v in inputs.items()})))
    return torch.cat(outs)


@pytest.mark.parametrize("case", list(CASES), ids=str)
def test_gather_through_banked_layers_equals_each_row_alone(case):
    build, wrappers = CASES[case]
    model, inputs, layout, bank, wrapped, mapping, layers = setup(build)
    assert {type(layer) for layer in layers} == wrappers
    rows = [2, 0, 1]
    want = alone(model, layout, bank, inputs, rows)
    assert not torch.allclose(want[0], alone(model, layout, bank, inputs, [0, 0, 0])[0], atol=1e-3)  # rows differ
    # the wrapped model's own biases are zeros, as the engine's flat buffer is in a gather batch (if any wrapper runs
    # its module's own bias), so anything they added would show
    if needs_zero_flat(layers):
        layout.scatter(wrapped, torch.zeros(layout.size))
    mapping.rows = torch.tensor(rows)
    with torch.no_grad():
        got = output(wrapped(**inputs))
    torch.testing.assert_close(got, want, **F32)
    # the same biases handed over whole, (batch, N), as an exported graph takes them
    mapping.rows, mapping.biases = None, bank.rows[rows]
    with torch.no_grad():
        torch.testing.assert_close(output(wrapped(**inputs)), want, **F32)


@pytest.mark.parametrize("case", list(CASES), ids=str)
def test_without_a_mapping_a_wrapped_model_is_the_model(case):
    build, _ = CASES[case]
    model, inputs, _, _, wrapped, mapping, _ = setup(build)
    assert mapping.rows is None
    with torch.no_grad():
        torch.testing.assert_close(output(wrapped(**inputs)), output(model(**inputs)), atol=0, rtol=0)


def test_wrapping_registers_no_hooks_and_refuses_a_second_wrap():
    model, _, layout, bank, wrapped, mapping, layers = setup(hf("bert"))
    assert len(layers) == len(layout.slots)
    for module in wrapped.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    assert all(isinstance(wrapped.get_submodule(s.path), BankedBias) for s in layout.slots)
    with pytest.raises(RuntimeError, match="wrapped already"):
        wrap_slots(wrapped, layout.slots, bank, mapping)


def test_a_mis_shaped_output_is_refused_rather_than_broadcast():
    # (b, h) biases onto a (t, b, h) output would broadcast silently and mix rows; the layer refuses
    layer = nn.Linear(4, 4)
    model = nn.Sequential(layer)
    layout = layout_of(model)
    bank = BiasBank(ServingSpec.for_layout(layout, hidden=4), layout.gather(model), capacity=2)
    mapping = BatchMapping(rows=torch.tensor([0, 1]))
    wrap_slots(model, layout.slots, bank, mapping)
    with pytest.raises(RuntimeError, match="cannot add"):
        model(torch.randn(3, 4))
