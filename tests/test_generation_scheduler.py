"""The continuous-batching scheduler on the real SmolLM2 with four generation tasks (slow: ~30 s on 2 cores).

Greedy generation of every sequence in a mixed batch (8 sequences, 4 tasks) is token-identical to that task alone
(`bitfit.generate.greedy` on the plain model with the task swapped in); sequences join mid-generation and leave
early without changing anyone's tokens; a cancelled sequence frees its slot for a waiting one; a bank change in the
middle of a sequence (its row evicted and reused by another set) does not change it. Then the pure pieces: stop
sequences while streaming, nucleus sampling, the KV cache's row edits."""

from __future__ import annotations

import pytest
import torch

import generation_support as gs
from server.generation import cache as kv
from server.generation.sampling import Sampler, SamplingParams, nucleus
from server.generation.scheduler import GenerationScheduler
from server.generation.stops import TextStream, find_stop, held_back

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N = 10  # new tokens per sequence: short, these run on a shared CPU


@pytest.fixture(scope="module")
def engine():
    gs.skip_without_smollm2()
    return gs.engine()


def run(scheduler: GenerationScheduler, jobs, params=None):
    """Submit (task, mr[, params]) jobs; returns their token lists (filled as the scheduler steps)."""
    outs = []
    for job in jobs:
        task, mr = job[:2]
        p = job[2] if len(job) > 2 else params or SamplingParams(max_tokens=N, temperature=0)
        tokens: list[int] = []
        scheduler.submit((task, "v0"), gs.prompt_ids(task, mr), p, lambda e, t=tokens: t.extend(e.tokens))
        outs.append(tokens)
    return outs


MIXED = [(task, mr) for task in gs.TASKS for mr in gs.MRS[:2]]  # 8 sequences, 4 tasks


def test_mixed_batch_of_8_from_4_tasks_is_token_identical_to_each_task_alone(engine):
    alone = {job: gs.reference(*job, N) for job in MIXED}
    for mr in gs.MRS[:2]:  # the tasks really differ, or this test could not fail
        assert len({alone[(t, mr)] for t in gs.TASKS}) > 1, mr
    scheduler = GenerationScheduler(engine, slots=8)
    order = MIXED[::2] + MIXED[1::2]  # tasks interleaved in the batch
    outs = run(scheduler, order)
    scheduler.run_until_idle()
    assert scheduler.stats.max_rows == 8 and scheduler.stats.prefills == 1
    for job, tokens in zip(order, outs):
        assert tuple(tokens) == alone[job], job


def test_sequences_join_mid_generation_and_leave_early_without_changing_tokens(engine):
    scheduler = GenerationScheduler(engine, slots=8)
    first = run(scheduler, MIXED[:2])
    for _ in range(3):
        scheduler.step()
    short = SamplingParams(max_tokens=3, temperature=0)
    later = run(scheduler, [MIXED[2], MIXED[5] + (short,), MIXED[6]])
    scheduler.step()
    assert len(scheduler.running) == 5  # joined at the step after they were submitted
    scheduler.run_until_idle()
    assert scheduler.stats.prefills == 2
    for job, tokens in zip(MIXED[:2] + [MIXED[2], MIXED[5], MIXED[6]], first + later):
        want = gs.reference(*job[:2], N)
        assert tuple(tokens) == (want[:3] if job == MIXED[5] else want), job


def test_cancelled_sequence_frees_its_slot_for_a_waiting_one(engine):
    scheduler = GenerationScheduler(engine, slots=2)
    outs = run(scheduler, MIXED[:3])
    scheduler.step()
    assert len(scheduler.running) == 2 and scheduler.waiting == 1
    cancelled_id = scheduler.running[0].request.ident
    seen = len(outs[0])
    scheduler.cancel(cancelled_id)
    scheduler.step()
    assert scheduler.waiting == 0 and len(scheduler.running) == 2  # the waiting one took the slot
    assert all(s.request.ident != cancelled_id for s in scheduler.running)
    scheduler.run_until_idle()
    assert len(outs[0]) == seen  # nothing after the cancel
    assert tuple(outs[1]) == gs.reference(*MIXED[1], N) and tuple(outs[2]) == gs.reference(*MIXED[2], N)


def test_bank_row_evicted_and_reused_mid_sequence_does_not_change_it(engine):
    from bitfit.bias_set import BiasSet

    task, mr = "e2e", gs.MRS[0]
    row = engine.bank.row((task, "v0"))
    scheduler = GenerationScheduler(engine, slots=4)
    (tokens,) = run(scheduler, [(task, mr)])
    for _ in range(3):
        scheduler.step()
    other = BiasSet.from_bytes(gs.variant(task, 99, scale=3.0))
    try:
        engine.bank.evict((task, "v0"))
        engine.bank.load((task, "v9"), other)
        assert engine.bank.row((task, "v9")) == row  # the freed row now holds other biases
        scheduler.run_until_idle()
    finally:
        engine.bank.evict((task, "v9"))
        engine.bank.load((task, "v0"), BiasSet.from_bytes(gs.variant(task, 0)))
    assert tuple(tokens) == gs.reference(task, mr, N)


def test_seeded_sampling_is_the_same_alone_and_in_a_mixed_batch(engine):
    sampled = SamplingParams(max_tokens=6, temperature=0.9, top_p=0.9, seed=1234)
    alone = GenerationScheduler(engine, slots=8)
    (want,) = run(alone, [MIXED[0] + (sampled,)])
    alone.run_until_idle()
    mixed = GenerationScheduler(engine, slots=8)
    outs = run(mixed, [MIXED[3], MIXED[0] + (sampled,), MIXED[5] + (SamplingParams(6, 1.0, 1.0, seed=7),)])
    mixed.run_until_idle()
    assert outs[1] == want and len(want) == 6


# -- the pure pieces -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("pushes, stop, sent, stopped", [
    (["Hello", "Hello wor", "Hello world"], ["\n"], "Hello world", False),
    (["A", "A b", "A b\nC"], ["\n"], "A b", True),
    (["x EN", "x END"], ["END"], "x ", True),  # "EN" held back until it is known to be a stop
    (["x EN", "x ENJOY"], ["END"], "x ENJOY", False),  # ... and sent once it is not
    (["caf\ufffd", "café"], [], "café", False),  # half a character waits for the rest
], ids=["no-stop", "stop-cuts", "prefix-held", "prefix-released", "utf8"])
def test_text_stream_sends_only_text_that_cannot_become_a_stop(pushes, stop, sent, stopped):
    stream = TextStream(stop)
    out = "".join(stream.push(p) for p in pushes)
    if not stopped:
        out += stream.finish(pushes[-1])
    assert out == sent and stream.stopped == (stopped or True)


def test_find_stop_and_held_back():
    assert find_stop("one two. three\n", ["\n", "."]) == 7
    assert find_stop("none", ["\n"]) is None
    assert held_back("abc <e", ["<end>"]) == 2 and held_back("abc", ["<end>"]) == 0


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    probs = torch.tensor([0.1, 0.5, 0.3, 0.1])
    torch.testing.assert_close(nucleus(probs.clone(), 0.7), torch.tensor([0.0, 0.625, 0.375, 0.0]))
    torch.testing.assert_close(nucleus(probs.clone(), 0.01), torch.tensor([0.0, 1.0, 0.0, 0.0]))
    greedy = Sampler(SamplingParams(temperature=0))
    assert greedy.pick(torch.tensor([0.1, 3.0, 0.2])) == 1
    a, b = Sampler(SamplingParams(seed=5)), Sampler(SamplingParams(seed=5))
    logits = torch.randn(50)
    assert [a.pick(logits) for _ in range(5)] == [b.pick(logits) for _ in range(5)]


class _Layer:
    is_initialized = True

    def __init__(self, keys):
        self.keys, self.values = keys, keys.clone() * 10


class _Cache:
    def __init__(self, keys):
        self.layers = [_Layer(keys)]


def test_kv_cache_rows_join_left_padded_leave_and_trim():
    a = _Cache(torch.arange(1, 7, dtype=torch.float).view(2, 1, 3, 1))  # 2 rows, 3 columns
    mask_a = torch.tensor([[0, 1, 1], [1, 1, 1]])
    b = _Cache(torch.tensor([[[[7.0], [8.0]]]]))  # 1 row, 2 columns
    cache, mask = kv.join(a, mask_a, b, torch.tensor([[1, 1]]))
    assert mask.tolist() == [[0, 1, 1], [1, 1, 1], [0, 1, 1]]
    assert cache.layers[0].keys[:, 0, :, 0].tolist() == [[1, 2, 3], [4, 5, 6], [0, 7, 8]]
    mask = kv.select(cache, mask, torch.tensor([0, 2]))  # the row with no padding leaves
    mask = kv.trim(cache, mask)
    assert mask.tolist() == [[1, 1], [1, 1]]
    assert cache.layers[0].keys[:, 0, :, 0].tolist() == [[2, 3], [7, 8]]
    assert cache.layers[0].values[:, 0, :, 0].tolist() == [[20, 30], [70, 80]]
