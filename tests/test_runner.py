"""The runner: one worker owns engine and bank, batches across tasks, applies bank changes only between batches,
tokenises at submit, budgets batches in inputs and padded tokens, and refuses work past its bound."""

from __future__ import annotations

import asyncio

import pytest
import torch

from bitfit.errors import BiasSetFormatError
from server.errors import Overloaded, VersionGone
from server.runtime.engine import choose_mode
from server.runtime.runner import Runner
from server.testing import alone, fresh_engine, minilm, random_bias_set

from conftest import TOLERANCES

F32 = TOLERANCES[torch.float32]
TEXTS = ["a quiet, moving film", "flat and lifeless", "it works", "why did I watch this"]


@pytest.mark.parametrize(
    ("tasks", "group_max", "mode"),
    [(1, 1, "swap"), (1, 4, "swap"), (2, 1, "gather"), (2, 2, "group"), (3, 2, "gather"), (0, 1, "swap")],
    ids=["one task", "one task, grouping on", "two tasks", "two tasks, group up to 2", "three tasks, group up to 2",
         "empty"],
)
def test_choose_mode(tasks, group_max, mode):
    assert choose_mode(tasks, group_max) == mode


@pytest.fixture(scope="module")
def backbone():
    return minilm()


@pytest.fixture(scope="module")
def sets(backbone):
    return {name: random_bias_set(backbone, name, labels, seed=i)
            for i, (name, labels) in enumerate([("a", ["n", "p"]), ("b", ["x", "y", "z"]), ("c", [])])}


@pytest.fixture(scope="module")
def engine():
    return fresh_engine()


@pytest.fixture(scope="module")
def expected(backbone, sets):
    return {name: alone(backbone, bias_set, TEXTS) for name, bias_set in sets.items()}


def run(engine, sets, coro_fn, **kw):
    """Start a runner holding `sets`, run `coro_fn(runner)` on a fresh event loop, stop it; returns
    (result, batches) where batches lists (mode, inputs) of every forward after the loads."""
    batches = []
    runner = Runner(engine, on_batch=lambda mode, n: batches.append((mode, n)), **kw)
    runner.start()

    async def main():
        for name, bias_set in sets.items():
            await runner.load(name, bias_set)
        return await coro_fn(runner)

    try:
        return asyncio.run(main()), batches
    finally:
        runner.stop()
        for key in list(engine.bank.keys()):
            engine.bank.evict(key)


def stacked(results) -> torch.Tensor:
    return torch.tensor([r.output for r in results])


def test_concurrent_requests_for_three_tasks_share_one_gather_batch(engine, sets, expected):
    async def go(runner):
        return await asyncio.gather(*(runner.submit(name, TEXTS) for name in ("a", "b", "c")))

    results, batches = run(engine, sets, go, max_batch=32, max_wait_ms=500)
    assert batches == [("gather", 12)]
    for name, result in zip("abc", results):
        torch.testing.assert_close(stacked(result), torch.stack(expected[name]), **F32)


def test_the_runner_tracks_what_is_resident_and_a_bad_set_changes_nothing(engine, sets, backbone):
    bad = random_bias_set(backbone, "bad", pooling="max")

    async def go(runner):
        assert runner.info("a").labels == ("n", "p") and runner.info("zzz") is None
        with pytest.raises(BiasSetFormatError, match="unknown pooling 'max'"):
            await runner.load("bad", bad)
        assert sorted(runner.resident()) == ["a", "b", "c"] and "bad" not in engine.bank
        assert await runner.evict("c") is True and await runner.evict("c") is False
        return sorted(runner.resident())

    resident, _ = run(engine, sets, go)
    assert resident == ["a", "b"]


def test_a_bank_change_applies_between_batches_never_inside_one(engine, backbone, sets):
    replacement = random_bias_set(backbone, "a2", ["n", "p"], seed=42)

    async def go(runner):
        before = asyncio.ensure_future(runner.submit("a", TEXTS[:2]))
        await asyncio.sleep(0)  # queued before the change, in the same collection window
        change = asyncio.ensure_future(runner.evict("a"))
        load = asyncio.ensure_future(runner.load("a", replacement))
        await asyncio.sleep(0)
        after = asyncio.ensure_future(runner.submit("a", TEXTS[:2]))
        return await before, await change, await load, await after

    (before, _, _, after), batches = run(engine, sets, go, max_wait_ms=500)
    assert batches == [("swap", 2), ("swap", 2)]
    old, new = alone(backbone, sets["a"], TEXTS[:2]), alone(backbone, replacement, TEXTS[:2])
    assert not torch.allclose(old[0], new[0], atol=1e-3)
    torch.testing.assert_close(stacked(before), torch.stack(old), **F32)
    torch.testing.assert_close(stacked(after), torch.stack(new), **F32)


def test_full_queue_is_refused_with_retry_after_then_drains(engine, sets, expected):
    async def go(runner):
        with runner.hold():  # the worker idles between batches
            await asyncio.sleep(0.05)
            waiting = [asyncio.ensure_future(runner.submit("a", TEXTS[:2])) for _ in range(3)]  # 6 of 6 inputs
            await asyncio.sleep(0)
            with pytest.raises(Overloaded) as refused:
                await runner.submit("b", TEXTS[:1])
            assert refused.value.retry_after == 3 and runner.queued == 6
        return await asyncio.gather(*waiting)

    results, _ = run(engine, sets, go, max_queued=6, retry_after_s=3)
    for result in results:
        torch.testing.assert_close(stacked(result), torch.stack(expected["a"][:2]), **F32)


def test_request_larger_than_a_batch_is_split_and_kept_in_order(engine, sets, expected):
    async def go(runner):
        return await runner.submit("c", TEXTS)

    result, batches = run(engine, sets, go, max_batch=3)
    assert batches == [("swap", 3), ("swap", 1)]
    torch.testing.assert_close(stacked(result), torch.stack(expected["c"]), **F32)


def test_batches_are_budgeted_in_padded_tokens_as_well_as_inputs(engine, sets, expected):
    long_text = "a long and winding review " * 12  # about 60 tokens, padded with the short ones to its length

    async def go(runner):
        with runner.hold():
            short = [asyncio.ensure_future(runner.submit("a", [t])) for t in TEXTS]
            await asyncio.sleep(0)
            long = asyncio.ensure_future(runner.submit("a", [long_text]))
            await asyncio.sleep(0)
        return await asyncio.gather(*short), await long

    (short, long), batches = run(engine, sets, go, max_batch=32, max_batch_tokens=200, max_wait_ms=200)
    assert batches == [("swap", 4), ("swap", 1)], "the long input would have padded every short one to ~60 tokens"
    torch.testing.assert_close(stacked([r[0] for r in short]), torch.stack(expected["a"]), **F32)
    torch.testing.assert_close(stacked(long), torch.stack(alone(minilm(), sets["a"], [long_text])), **F32)


def test_inputs_are_tokenised_when_submitted_not_on_the_worker(engine, sets, monkeypatch):
    import threading

    seen = []
    encode = engine.encoder.encode
    monkeypatch.setattr(engine.encoder, "encode", lambda items: seen.append(threading.current_thread().name) or encode(items))

    async def go(runner):
        return await runner.submit("a", TEXTS[:1])

    run(engine, sets, go)
    assert seen == [threading.main_thread().name]


def test_request_for_a_version_no_longer_resident_fails_alone(engine, sets, expected):
    async def go(runner):
        return await asyncio.gather(runner.submit("gone", TEXTS[:1]), runner.submit("b", TEXTS[:1]),
                                    return_exceptions=True)

    (gone, fine), _ = run(engine, sets, go, max_wait_ms=200)
    assert isinstance(gone, VersionGone)
    torch.testing.assert_close(torch.tensor(fine[0].output), expected["b"][0], **F32)


def test_truncation_flag_reaches_each_result(engine, sets):
    async def go(runner):
        return await runner.submit("a", ["short", "word " * 500])

    result, _ = run(engine, sets, go)
    assert [r.truncated for r in result] == [False, True]


def test_one_text_fanned_out_to_three_tasks_is_one_gather_batch_equal_to_each_alone(engine, sets, expected):
    async def go(runner):
        return await runner.submit_many([(name, TEXTS[:2]) for name in ("a", "b", "c")])

    results, batches = run(engine, sets, go, max_wait_ms=0)
    assert batches == [("gather", 6)]
    for k, name in enumerate("abc"):
        torch.testing.assert_close(stacked(results[2 * k : 2 * k + 2]), torch.stack(expected[name][:2]), **F32)
