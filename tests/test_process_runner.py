"""The engine in its own process (`ProcessRunner`): the runner's interface over a pipe. What the server sees is what
the in-process runner gives: the same outputs as each task alone, bank changes reported before they are
acknowledged, bad bias sets refused with the engine's own error, and a dead engine process fails waiting and later
requests with 503 instead of hanging them."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
import torch

from bitfit.errors import BiasSetFormatError
from server.errors import NotReady
from server.runtime.process import ProcessRunner
from server.settings import Settings
from server.testing import alone, minilm, random_bias_set

from conftest import TOLERANCES

F32 = TOLERANCES[torch.float32]
TEXTS = ["a quiet, moving film", "flat and lifeless", "it works", "why did I watch this"]


@pytest.fixture(scope="module")
def backbone():
    return minilm()


@pytest.fixture(scope="module")
def sets(backbone):
    return {"a": random_bias_set(backbone, "a", seed=1),
            "b": random_bias_set(backbone, "b", ["x", "y", "z"], pooling="cls", seed=2)}


@pytest.fixture
def runner(tmp_path):
    r = ProcessRunner(Settings(store=str(tmp_path / "store"), threads=1), max_wait_ms=2)
    r.start()
    yield r
    r.stop()


def run(coro):
    return asyncio.run(coro)


def test_a_mixed_request_through_the_engine_process_equals_each_task_alone(runner, backbone, sets):
    async def go():
        for name, s in sets.items():
            assert await runner.load(name, s)
        return await runner.submit_many([("a", TEXTS[:2]), ("b", TEXTS[2:])])

    results = run(go())
    want = alone(backbone, sets["a"], TEXTS[:2]) + alone(backbone, sets["b"], TEXTS[2:])
    assert len(results) == 4
    for got, ref in zip(results, want):
        torch.testing.assert_close(torch.tensor(got.output), ref.flatten(), **F32)
        assert got.truncated is False


def test_what_is_resident_is_known_in_the_server_before_a_change_is_acknowledged(runner, sets):
    assert runner.resident() == []
    run(runner.load("a", sets["a"]))
    info = runner.info("a")  # no round trip: the reply carried it
    assert info is not None and info.count == 2
    assert runner.bank_bytes > 0
    run(runner.evict("a"))
    assert runner.info("a") is None and runner.resident() == []


def test_a_bias_set_the_engine_refuses_comes_back_as_its_error_and_the_engine_keeps_serving(runner, backbone, sets):
    broken = random_bias_set(backbone, "bad", pooling="max")

    async def go():
        with pytest.raises(BiasSetFormatError, match="unknown pooling 'max'"):
            await runner.load("bad", broken)
        await runner.load("a", sets["a"])
        return await runner.submit("a", TEXTS[:1])

    assert len(run(go())) == 1
    assert runner.info("bad") is None


def test_a_dead_engine_process_fails_waiting_and_new_requests_with_not_ready(runner, sets, monkeypatch):
    # the server would stop itself so its supervisor restarts it; here only that decision is observed
    stops, kill = [], os.kill
    monkeypatch.setattr(os, "kill", lambda pid, sig: stops.append((pid, sig)) if pid == os.getpid() else kill(pid, sig))

    async def go():
        await runner.load("a", sets["a"])
        with runner.hold():  # the request below waits in the engine process when it dies
            pending = asyncio.ensure_future(runner.submit("a", TEXTS))
            await asyncio.sleep(0.3)
            runner.process.kill()
            with pytest.raises(NotReady, match="engine process exited"):
                await asyncio.wait_for(pending, 30)
        with pytest.raises(NotReady, match="engine process exited"):
            await runner.submit("a", TEXTS[:1])

    run(go())
    # the reader thread fails the waiters first and stops the server just after: allow it that moment
    deadline = time.monotonic() + 10
    while not stops and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stops == [(os.getpid(), signal.SIGTERM)]
    assert "engine process exited" in runner.failure
