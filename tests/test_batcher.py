"""The batcher: batches across tasks, applies bank changes only between batches, and refuses work past its bound."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from server.batcher import Batcher, choose_mode
from server.errors import Overloaded, VersionGone
from server.testing import alone, fresh_engine, minilm, random_bias_set

from conftest import TOLERANCES

F32 = TOLERANCES[torch.float32]
TEXTS = ["a quiet, moving film", "flat and lifeless", "it works", "why did I watch this"]


@pytest.mark.parametrize(
    ("counts", "group_max", "mode"),
    [([5], 1, "swap"), ([1], 4, "swap"), ([3, 2], 1, "gather"), ([3, 2], 2, "group"), ([1, 1, 1], 2, "gather"),
     ([], 1, "swap")],
    ids=["one task", "one task, grouping on", "two tasks", "two tasks, group up to 2", "three tasks, group up to 2",
         "empty"],
)
def test_choose_mode(counts, group_max, mode):
    assert choose_mode(counts, group_max) == mode


@pytest.fixture(scope="module")
def backbone():
    return minilm()


@pytest.fixture(scope="module")
def sets(backbone):
    return {name: random_bias_set(backbone, name, labels, seed=i)
            for i, (name, labels) in enumerate([("a", ["n", "p"]), ("b", ["x", "y", "z"]), ("c", [])])}


@pytest.fixture(scope="module")
def engine(sets):
    engine = fresh_engine()
    for name, bias_set in sets.items():
        engine.bank.load(name, bias_set)
    return engine


@pytest.fixture(scope="module")
def expected(backbone, sets):
    return {name: alone(backbone, bias_set, TEXTS) for name, bias_set in sets.items()}


def run(engine, coro_fn, **kw):
    """Start a batcher, run `coro_fn(batcher)` on a fresh event loop, stop the batcher; returns (result, batches)."""
    batches = []
    batcher = Batcher(engine, on_batch=lambda mode, n: batches.append((mode, n)), **kw)
    batcher.start()
    try:
        return asyncio.run(coro_fn(batcher)), batches
    finally:
        batcher.stop()


def test_concurrent_requests_for_three_tasks_share_one_gather_batch(engine, expected):
    async def go(batcher):
        return await asyncio.gather(*(batcher.submit(name, TEXTS) for name in ("a", "b", "c")))

    results, batches = run(engine, go, max_batch=32, max_wait_ms=500)
    assert batches == [("gather", 12)]
    for name, result in zip("abc", results):
        torch.testing.assert_close(torch.stack([r.output for r in result]), torch.stack(expected[name]), **F32)


def test_a_bank_change_applies_between_batches_never_inside_one(engine, backbone, sets):
    replacement = random_bias_set(backbone, "a", ["n", "p"], seed=42)

    def replace():
        engine.bank.evict("a")
        engine.bank.load("a", replacement)

    async def go(batcher):
        before = asyncio.ensure_future(batcher.submit("a", TEXTS[:2]))
        await asyncio.sleep(0)  # queued before the change, in the same collection window
        change = asyncio.ensure_future(batcher.call(replace))
        await asyncio.sleep(0)
        after = asyncio.ensure_future(batcher.submit("a", TEXTS[:2]))
        return await before, await change, await after

    try:
        (before, _, after), batches = run(engine, go, max_wait_ms=500)
        assert batches == [("swap", 2), ("swap", 2)]
        old, new = alone(backbone, sets["a"], TEXTS[:2]), alone(backbone, replacement, TEXTS[:2])
        assert not torch.allclose(old[0], new[0], atol=1e-3)
        torch.testing.assert_close(torch.stack([r.output for r in before]), torch.stack(old), **F32)
        torch.testing.assert_close(torch.stack([r.output for r in after]), torch.stack(new), **F32)
    finally:
        engine.bank.evict("a")
        engine.bank.load("a", sets["a"])


def test_full_queue_is_refused_with_retry_after_then_drains(engine, expected):
    gate = threading.Event()

    async def go(batcher):
        blocker = asyncio.ensure_future(batcher.call(gate.wait))  # holds the worker between batches
        await asyncio.sleep(0.05)
        waiting = [asyncio.ensure_future(batcher.submit("a", TEXTS[:2])) for _ in range(3)]  # 6 of 6 inputs
        await asyncio.sleep(0)
        with pytest.raises(Overloaded) as refused:
            await batcher.submit("b", TEXTS[:1])
        assert refused.value.retry_after == 3 and batcher.queued == 6
        gate.set()
        await blocker
        return await asyncio.gather(*waiting)

    results, _ = run(engine, go, max_queued=6, retry_after_s=3)
    for result in results:
        torch.testing.assert_close(torch.stack([r.output for r in result]), torch.stack(expected["a"][:2]), **F32)


def test_request_larger_than_a_batch_is_split_and_kept_in_order(engine, expected):
    async def go(batcher):
        return await batcher.submit("c", TEXTS)

    result, batches = run(engine, go, max_batch=3)
    assert batches == [("swap", 3), ("swap", 1)]
    torch.testing.assert_close(torch.stack([r.output for r in result]), torch.stack(expected["c"]), **F32)


def test_request_for_a_version_no_longer_resident_fails_alone(engine, expected):
    async def go(batcher):
        return await asyncio.gather(batcher.submit("gone", TEXTS[:1]), batcher.submit("b", TEXTS[:1]),
                                    return_exceptions=True)

    (gone, fine), _ = run(engine, go, max_wait_ms=200)
    assert isinstance(gone, VersionGone)
    torch.testing.assert_close(fine[0].output, expected["b"][0], **F32)


def test_truncation_flag_reaches_each_result(engine):
    async def go(batcher):
        return await batcher.submit("a", ["short", "word " * 500])

    result, _ = run(engine, go)
    assert [r.truncated for r in result] == [False, True]
