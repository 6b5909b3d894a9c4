"""The bias bank: rows of absolute biases and one head table, load before evict, idempotent changes, growth that
keeps rows intact."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from bitfit.errors import BackboneMismatch, BiasSetFormatError
from bitfit.spec import ServingSpec
from server.runtime.bank import BiasBank
from server.testing import minilm, random_bias_set


@pytest.fixture(scope="module")
def backbone():
    return minilm()


def new_bank(backbone, **kw):
    return BiasBank(ServingSpec.of(backbone), backbone.original, **kw)


@pytest.fixture
def bank(backbone):
    return new_bank(backbone, capacity=2)


def snapshot(bank):
    return bank.keys(), {k: bank.rows[bank.row(k)].clone() for k in bank.keys()}, dict(bank.info)


def head_of(bank, key):
    """A resident head as (weight, bias), read back out of the head table."""
    info = bank.info[bank.row(key)]
    return bank.head_weight[info.offset : info.offset + info.count], bank.head_bias[info.offset : info.offset + info.count]


def test_row_holds_original_plus_delta(bank, backbone):
    bias_set = random_bias_set(backbone, "a")
    assert bank.load(("a", "v1"), bias_set) is True
    torch.testing.assert_close(bank.rows[bank.row(("a", "v1"))], backbone.original + bias_set.delta)
    assert bank.info[bank.row(("a", "v1"))].labels == ("negative", "positive")
    weight, bias = head_of(bank, ("a", "v1"))
    torch.testing.assert_close(weight, bias_set.head["out.weight"])
    torch.testing.assert_close(bias, bias_set.head["out.bias"])


def test_load_twice_is_a_no_op(bank, backbone):
    bank.load("a", random_bias_set(backbone, "a"))
    before = snapshot(bank)
    assert bank.load("a", random_bias_set(backbone, "a", seed=9)) is False
    after = snapshot(bank)
    assert before[0] == after[0]
    torch.testing.assert_close(before[1]["a"], after[1]["a"])


def test_evict_twice_is_a_no_op(bank, backbone):
    bank.load("a", random_bias_set(backbone, "a"))
    assert bank.evict("a") is True
    assert bank.evict("a") is False
    assert "a" not in bank and len(bank) == 0


def test_evicted_row_is_reused(bank, backbone):
    bank.load("a", random_bias_set(backbone, "a"))
    row = bank.row("a")
    bank.evict("a")
    bank.load("b", random_bias_set(backbone, "b", seed=2))
    assert bank.row("b") == row


def test_growing_past_capacity_keeps_every_resident_row(bank, backbone):
    sets = {f"t{i}": random_bias_set(backbone, f"t{i}", seed=i) for i in range(5)}
    for name, bias_set in sets.items():
        bank.load(name, bias_set)
    assert bank.rows.shape[0] >= 5
    for name, bias_set in sets.items():
        torch.testing.assert_close(bank.rows[bank.row(name)], backbone.original + bias_set.delta)


def test_the_table_grows_by_an_eighth_and_reserve_sizes_it_exactly(backbone):
    bank = new_bank(backbone, capacity=64)
    sets = [random_bias_set(backbone, f"t{i}", seed=i) for i in range(66)]
    for i, bias_set in enumerate(sets[:65]):
        bank.load(f"t{i}", bias_set)
    assert bank.capacity == 72, "64 + 64/8: never twice what is needed"
    bank.evict("t3")
    bank.reserve(100)
    assert bank.capacity == 100
    bank.load("t65", sets[65])
    assert bank.row("t65") == 3, "a freed row is used before the new ones"
    bank.reserve(10)
    assert bank.capacity == 100, "reserve never shrinks"
    for i in [*range(3), *range(4, 66)]:
        torch.testing.assert_close(bank.rows[bank.row(f"t{i}")], backbone.original + sets[i].delta)
    assert len(set(bank.row(k) for k in bank.keys())) == len(bank) == 65


def bad_sets(backbone):
    good = random_bias_set(backbone, "bad")
    return {
        "other backbone": dataclasses.replace(good, fingerprint="0" * 64),
        "short delta": dataclasses.replace(good, delta=good.delta[:-1]),
        "head width": dataclasses.replace(good, head={"out.weight": torch.zeros(2, 10), "out.bias": torch.zeros(2)}),
        "label count": dataclasses.replace(good, labels=["a", "b", "c"]),
        "pooling": dataclasses.replace(good, pooling="max"),
    }


@pytest.mark.parametrize("case", ["other backbone", "short delta", "head width", "label count", "pooling"], ids=str)
def test_bad_bias_set_is_refused_and_bank_unchanged(bank, backbone, case):
    bank.load("good", random_bias_set(backbone, "good"))
    before, generation = snapshot(bank), bank.generation
    with pytest.raises((BackboneMismatch, BiasSetFormatError)):
        bank.load("bad", bad_sets(backbone)[case])
    after = snapshot(bank)
    assert after[0] == before[0] == ["good"] and bank.generation == generation
    torch.testing.assert_close(after[1]["good"], before[1]["good"])


def test_pooler_pooling_refused_on_a_backbone_without_pooler(backbone):
    spec = dataclasses.replace(ServingSpec.of(backbone), has_pooler=False)
    bank = BiasBank(spec, backbone.original)
    with pytest.raises(BiasSetFormatError, match="pooler"):
        bank.load("p", random_bias_set(backbone, "p", pooling="pooler"))
    assert len(bank) == 0


def test_nbytes_counts_rows_and_the_head_table(bank, backbone):
    assert bank.nbytes == bank.rows.nbytes + bank.head_weight.nbytes + bank.head_bias.nbytes
    assert bank.head_weight.shape[1] == backbone.hidden_size


def test_heads_of_one_width_reuse_a_freed_run_and_wider_ones_grow_the_table(backbone):
    bank = new_bank(backbone)
    bank.load("a", random_bias_set(backbone, "a"))
    bank.load("b", random_bias_set(backbone, "b", ["x", "y", "z"], seed=2))
    offset_a = bank.info[bank.row("a")].offset
    bank.evict("a")
    bank.load("c", random_bias_set(backbone, "c", seed=3))  # two labels, like a
    assert bank.info[bank.row("c")].offset == offset_a
    wide = random_bias_set(backbone, "wide", [f"l{i}" for i in range(40)], seed=4)
    bank.load("wide", wide)
    assert bank.head_weight.shape[0] >= 2 + 3 + 40
    for key, labels in (("b", 3), ("c", 2), ("wide", 40)):
        assert head_of(bank, key)[0].shape == (labels, backbone.hidden_size)
    torch.testing.assert_close(head_of(bank, "wide")[0], wide.head["out.weight"])
    torch.testing.assert_close(head_of(bank, "b")[0], random_bias_set(backbone, "b", ["x", "y", "z"], seed=2).head["out.weight"])


def test_head_index_pads_each_row_to_the_widest_head_of_the_batch(backbone):
    bank = new_bank(backbone)
    bank.load("two", random_bias_set(backbone, "two"))
    bank.load("reg", random_bias_set(backbone, "reg", [], seed=2))
    rows = [bank.row("two"), bank.row("reg"), bank.row("two")]
    idx, widths = bank.head_index(rows)
    two, reg = bank.info[rows[0]], bank.info[rows[1]]
    assert widths == [2, 1, 2]
    assert idx.tolist() == [[two.offset, two.offset + 1], [reg.offset, reg.offset], [two.offset, two.offset + 1]]


def test_bank_rows_take_the_engine_dtype(backbone):
    bank = new_bank(backbone, dtype=torch.bfloat16)
    bias_set = random_bias_set(backbone, "a")
    bank.load("a", bias_set)
    assert bank.rows.dtype == torch.bfloat16
    # the sum is taken in float32 and rounded once
    torch.testing.assert_close(bank.rows[bank.row("a")], (backbone.original + bias_set.delta).to(torch.bfloat16))


def mapped(address: int) -> bool:
    """Whether `address` lies in one of this process's memory mappings (Linux)."""
    for line in open("/proc/self/maps"):
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        if lo <= address < hi:
            return True
    return False


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux's /proc/self/maps")
def test_a_table_the_bank_outgrows_goes_back_to_the_os_when_freed(backbone):
    import gc

    bank = BiasBank(ServingSpec.of(backbone), backbone.original, capacity=8)
    old = bank.rows.data_ptr()
    assert mapped(old) and bank.rows.abs().sum() == 0  # a zeroed table
    bank.reserve(2000)  # 2,000 rows of 104 KB: far above any allocator's threshold for the heap
    gc.collect()
    assert not mapped(old), "the outgrown table is still mapped"
    bank.load("a", random_bias_set(backbone, "a", seed=1))  # the new table is written as any other
    assert bank.rows[bank.row("a")].abs().sum() > 0
