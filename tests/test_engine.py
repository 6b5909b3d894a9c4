"""The engine on the real MiniLM: swap, gather and group all give each task's own outputs, final logits compared."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from bitfit.bias_set import load_bias_set
from server.testing import alone, fresh_engine, minilm, random_bias_set

from conftest import TOLERANCES

F32 = TOLERANCES[torch.float32]
SEED_DIR = Path(os.environ.get("BITFIT_SEED_DIR") or Path(__file__).resolve().parents[1] / "server" / "seed")
TEXTS = ["a gripping, beautifully acted film", "dull.", "I expected more from the director of such a fine debut",
         "not bad at all", "the worst two hours of my year, and the popcorn was stale too"]
PAIRS = [("A man is playing a guitar.", "Someone plays music."), ("The cat sleeps.", "A stock market crashed."),
         ("Two dogs run in a field.", "Dogs are running outside on the grass."), ("Hi", "Hello")]


@pytest.fixture(scope="module")
def backbone():
    return minilm()


@pytest.fixture(scope="module")
def tasks(backbone):
    """Name -> (bias set, inputs): two single-text tasks sharing a head (only their biases differ), a 3-label
    pair task read through BERT's pooler (whose dense layer sees [batch, hidden]), and a regression task."""
    return {
        "sent": (random_bias_set(backbone, "sent", seed=1, head_seed=7), TEXTS),
        "sent_b": (random_bias_set(backbone, "sent_b", seed=2, head_seed=7), TEXTS[::-1]),
        "nli": (random_bias_set(backbone, "nli", ["entail", "neutral", "contra"], pooling="pooler", seed=3), PAIRS),
        "sts": (random_bias_set(backbone, "sts", [], pooling="cls", seed=4), PAIRS[::-1]),
    }


@pytest.fixture(scope="module")
def engine(tasks):
    engine = fresh_engine()
    for name, (bias_set, _) in tasks.items():
        engine.bank.load(name, bias_set)
    return engine


@pytest.fixture(scope="module")
def expected(backbone, tasks):
    return {name: alone(backbone, bias_set, items) for name, (bias_set, items) in tasks.items()}


def interleave(tasks, engine):
    """Inputs of every task, alternating tasks row by row, with the bank row of each."""
    names = list(tasks)
    order = [(n, i) for i in range(max(len(items) for _, items in tasks.values())) for n in names
             if i < len(tasks[n][1])]
    items = [tasks[n][1][i] for n, i in order]
    rows = torch.tensor([engine.bank.row(n) for n, _ in order])
    return order, items, rows


def test_bias_parameters_are_views_into_one_flat_buffer(engine):
    flat = engine.flat
    lo, hi = flat.data_ptr(), flat.data_ptr() + flat.numel() * flat.element_size()
    for slot, module in engine.slots:
        assert lo <= module.bias.data_ptr() < hi, slot.path
        assert module.bias.data_ptr() == flat.data_ptr() + slot.offset * flat.element_size()
    engine._swap_in(engine.bank.row("sent"))
    torch.testing.assert_close(engine.layout.gather(engine.model), engine.bank.rows[engine.bank.row("sent")])


def test_tasks_alone_differ_from_each_other(expected):
    # a task that equals another would make the equivalence tests below prove nothing
    for i in range(len(TEXTS)):  # same text, same head: only the biases differ
        assert not torch.allclose(expected["sent"][i], expected["sent_b"][-1 - i], atol=1e-2)
    assert not torch.allclose(expected["nli"][0], torch.zeros(3), atol=1e-2)
    assert len({round(float(o[0]), 3) for o in expected["sts"]}) == len(expected["sts"])


@pytest.mark.parametrize("mode", ["gather", "group"], ids=["gather", "group"])
def test_mixed_batch_matches_each_task_alone(engine, tasks, expected, mode):
    order, items, rows = interleave(tasks, engine)
    encoded, _ = engine.encode(items)
    out = engine.run(encoded, rows, mode)
    assert out.mode == mode
    for (name, i), got in zip(order, out.outputs):
        torch.testing.assert_close(got, expected[name][i], **F32, msg=lambda m: f"{name}[{i}] {mode}: {m}")


@pytest.mark.parametrize("name", ["sent", "sent_b", "nli", "sts"], ids=str)
def test_swap_batch_matches_task_alone(engine, tasks, expected, name):
    encoded, _ = engine.encode(tasks[name][1])
    out = engine.run(encoded, torch.full((len(tasks[name][1]),), engine.bank.row(name)))
    assert out.mode == "swap"
    for i, got in enumerate(out.outputs):
        torch.testing.assert_close(got, expected[name][i], **F32)


def test_swap_after_gather_after_swap_keeps_every_answer(engine, tasks, expected):
    # the flat buffer goes task row -> zeros (gather) -> task row: each transition must restore the right biases
    order, items, rows = interleave(tasks, engine)
    for _ in range(2):
        encoded, _ = engine.encode(tasks["sent"][1])
        swap = engine.run(encoded, torch.full((len(tasks["sent"][1]),), engine.bank.row("sent")))
        torch.testing.assert_close(torch.stack(swap.outputs), torch.stack(expected["sent"]), **F32)
        encoded, _ = engine.encode(items)
        gather = engine.run(encoded, rows)
        assert gather.mode == "gather"
        for (name, i), got in zip(order, gather.outputs):
            torch.testing.assert_close(got, expected[name][i], **F32)


def test_gather_leaves_every_bias_a_view_into_the_flat_buffer(engine, tasks):
    # the banked-bias wrappers compute without the module's bias in a gather batch; nothing may replace it
    _, items, rows = interleave(tasks, engine)
    engine.run(engine.encode(items)[0], rows, "gather")
    for slot, module in engine.slots:
        assert module.bias is not None, slot.path
        assert module.bias.data_ptr() == engine.flat.data_ptr() + slot.offset * engine.flat.element_size()


def test_gather_of_one_task_equals_swap(engine, tasks):
    encoded, _ = engine.encode(tasks["nli"][1])
    rows = torch.full((len(tasks["nli"][1]),), engine.bank.row("nli"))
    swap, gather = engine.run(encoded, rows, "swap"), engine.run(encoded, rows, "gather")
    torch.testing.assert_close(torch.stack(gather.outputs), torch.stack(swap.outputs), **F32)


def test_a_batch_of_32_rows_from_32_tasks_equals_each_task_alone(backbone):
    engine = fresh_engine()
    sets = [random_bias_set(backbone, f"t{i}", [f"l{j}" for j in range(2 + i % 3)] if i % 4 else [],
                            pooling=("mean", "cls", "pooler", "mean")[i % 4], seed=100 + i) for i in range(32)]
    for s in sets:
        engine.bank.load(s.task, s)
    items = [TEXTS[i % len(TEXTS)] if i % 2 else PAIRS[i % len(PAIRS)] for i in range(32)]
    out = engine.run(engine.encode(items)[0], [engine.bank.row(s.task) for s in sets])
    assert out.mode == "gather" and out.widths == [s.num_outputs for s in sets]
    for s, item, got in zip(sets, items, out.outputs):
        torch.testing.assert_close(got, alone(backbone, s, [item])[0], **F32, msg=lambda m: f"{s.task}: {m}")


def test_the_engine_wraps_every_slot_and_registers_no_hooks(engine):
    from server.runtime.layers import BankedBias

    assert len(engine.layers) == len(engine.layout.slots) == 50
    for module in engine.model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    for slot, base in engine.slots:
        wrapper = engine.model.get_submodule(slot.path)
        assert isinstance(wrapper, BankedBias) and wrapper.base is base and wrapper.mapping is engine.mapping


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_compiled_engine_matches_each_task_alone_in_swap_and_gather(tasks, expected):
    engine = fresh_engine(compile=True)
    for name, (bias_set, _) in tasks.items():
        engine.bank.load(name, bias_set)
    order, items, rows = interleave(tasks, engine)
    gather = engine.run(engine.encode(items)[0], rows)
    assert gather.mode == "gather"
    for (name, i), got in zip(order, gather.outputs):
        torch.testing.assert_close(got, expected[name][i], **F32, msg=lambda m: f"{name}[{i}] compiled gather: {m}")
    for name in ("sent", "nli"):
        swap = engine.run(engine.encode(tasks[name][1])[0], [engine.bank.row(name)] * len(tasks[name][1]))
        assert swap.mode == "swap"
        torch.testing.assert_close(torch.stack(swap.outputs), torch.stack(expected[name]), **F32)


def test_outputs_have_each_task_width(engine, tasks):
    order, items, rows = interleave(tasks, engine)
    out = engine.run(engine.encode(items)[0], rows)
    widths = {"sent": 2, "sent_b": 2, "nli": 3, "sts": 1}
    assert [o.shape for o in out.outputs] == [torch.Size([widths[n]]) for n, _ in order]


def test_swap_refuses_a_batch_of_several_tasks(engine, tasks):
    _, items, rows = interleave(tasks, engine)
    with pytest.raises(ValueError, match="one task per batch"):
        engine.run(engine.encode(items)[0], rows, "swap")


def test_run_refuses_a_row_that_holds_no_task(engine):
    encoded, _ = engine.encode(["x"])
    with pytest.raises(KeyError, match="holds no task"):
        engine.run(encoded, torch.tensor([engine.bank.rows.shape[0] - 1 + 100]))


def test_encode_flags_inputs_cut_to_the_model_maximum(engine):
    long = "word " * 400
    encoded, truncated = engine.encode(["short", long, ("a", long), ("a", "b")])
    assert truncated == [False, True, True, False]
    assert encoded["input_ids"].shape == (4, engine.max_length)
    assert encoded["attention_mask"][0].sum() == 3  # [CLS] short [SEP], the rest padding


def test_mixed_texts_and_pairs_match_separate_batches(engine, tasks, expected):
    # singles and pairs are tokenised apart and padded together: padding must not change any answer
    items = [TEXTS[0], PAIRS[0], TEXTS[1]]
    rows = torch.tensor([engine.bank.row(n) for n in ("sent", "nli", "sent")])
    out = engine.run(engine.encode(items)[0], rows)
    torch.testing.assert_close(out.outputs[0], expected["sent"][0], **F32)
    torch.testing.assert_close(out.outputs[1], expected["nli"][0], **F32)
    torch.testing.assert_close(out.outputs[2], expected["sent"][1], **F32)


def shipped() -> list[Path]:
    return sorted(SEED_DIR.glob("*.safetensors"))


def test_shipped_bias_sets_are_present():
    names = {p.stem for p in shipped()}
    assert {"sst2", "mrpc", "stsb"} <= names, f"server/seed/ holds {sorted(names)}"


@pytest.mark.skipif(not shipped(), reason="no shipped bias sets in server/seed/ yet (see the test above)")
def test_shipped_tasks_in_one_gather_batch_match_each_alone(backbone):
    sets = {p.stem: load_bias_set(p) for p in shipped()}
    sets["other"] = random_bias_set(backbone, "other", seed=5)  # a mixed batch even with one shipped task
    engine = fresh_engine()
    for name, bias_set in sets.items():
        engine.bank.load(name, bias_set)
    inputs = {name: (PAIRS[:3] if name in ("mrpc", "stsb", "rte", "qnli") else TEXTS[:3]) for name in sets}
    order = [(n, i) for i in range(3) for n in sets]
    items = [inputs[n][i] for n, i in order]
    rows = torch.tensor([engine.bank.row(n) for n, _ in order])
    out = engine.run(engine.encode(items)[0], rows)
    assert out.mode == "gather"
    for name, bias_set in sets.items():
        want = alone(backbone, bias_set, inputs[name])
        got = [o for (n, _), o in zip(order, out.outputs) if n == name]
        torch.testing.assert_close(torch.stack(got), torch.stack(want), **F32)


def test_bfloat16_engine_keeps_the_float32_fingerprint_and_gather_equals_group(backbone, tasks):
    engine = fresh_engine(dtype="bfloat16")
    assert engine.flat.dtype == torch.bfloat16 and engine.layout.fingerprint == backbone.layout.fingerprint
    for name in ("sent", "nli"):
        engine.bank.load(name, tasks[name][0])
    items = [TEXTS[0], PAIRS[0], TEXTS[1], PAIRS[1]]
    rows = torch.tensor([engine.bank.row(n) for n in ("sent", "nli", "sent", "nli")])
    encoded, _ = engine.encode(items)
    gather, group = engine.run(encoded, rows, "gather"), engine.run(encoded, rows, "group")
    for g, s in zip(gather.outputs, group.outputs):
        torch.testing.assert_close(g, s, **TOLERANCES[torch.bfloat16])
