"""The serving benchmark's plumbing (`bench/serving*.py`) at tiny sizes: traffic, interleaved timing, the
policies really running the modes they claim, the verdict, and the BENCHMARKS.md block. Not the benchmark.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import serving_engine as se  # noqa: E402
import serving_report as sr  # noqa: E402


def test_assign_tasks_is_uniform_and_repeatable():
    tasks = se.assign_tasks(20_000, 10)
    assert tasks == se.assign_tasks(20_000, 10)
    counts = Counter(tasks)
    assert set(counts) == set(range(10))
    assert max(counts.values()) / min(counts.values()) < 1.15


def test_batches_keep_arrival_order_and_sizes():
    out = se.batches(list("abcdefg"), [0, 1, 2, 0, 1, 2, 0], 3)
    assert [len(t) for t, _ in out] == [3, 3, 1]
    assert out[1] == (["d", "e", "f"], [0, 1, 2])


def test_interleave_rotates_the_order_and_ratios_are_per_round():
    calls = []
    variants = {name: (lambda n=name: calls.append(n) or 1) for name in "abc"}
    samples = se.interleave(variants, rounds=3, warmup=False)
    assert calls == list("abc" "bca" "cab")
    assert all(len(v) == 3 for v in samples.values())
    assert se.median_ratio([2, 4, 100], [1, 2, 1]) == 2


@pytest.fixture(scope="module")
def minilm_engine():
    from server.testing import minilm

    backbone = minilm()
    return backbone, se.make_engine(backbone, se.random_sets(backbone, 3), max_batch=4)


@pytest.mark.slow
def test_policies_run_the_modes_they_claim_and_swap_is_timed(minilm_engine):
    backbone, engine = minilm_engine
    texts = ["a fine film", "dull.", "not bad", "brilliant"]
    mixed, single = se.batches(texts, [0, 1, 2, 0], 4), se.batches(texts, [2] * 4, 4)
    modes = {"gather": {}, "swap-only": {}, "single": {}}
    assert se.engine_policy(engine, mixed, 1, modes["gather"])() == 4
    assert se.engine_policy(engine, mixed, se.SWAP_ONLY, modes["swap-only"])() == 4
    assert se.engine_policy(engine, single, 1, modes["single"])() == 4
    assert modes == {"gather": {"gather": 1}, "swap-only": {"group": 1}, "single": {"swap": 1}}
    swap = se.swap_cost(engine, {2: engine.encode(texts[:2])[0]}, rounds=1, swaps_per_block=5, n_tasks=3)
    assert swap["bytes"] == backbone.layout.size * 4
    assert 0 < swap["batches"][2]["ratio"] < 1


@pytest.mark.slow
def test_peft_policy_serves_every_row_through_its_own_adapter(minilm_engine):
    backbone, engine = minilm_engine
    model = se.peft_multi_lora(backbone, 2)
    enc, _ = engine.encode(["a fine film", "a fine film"])
    with torch.inference_mode():
        mixed = model(**enc, adapter_names=["t0", "t1"]).last_hidden_state
        alone = [model(**{k: v[i : i + 1] for k, v in enc.items()}, adapter_names=[f"t{i}"]).last_hidden_state
                 for i in range(2)]
    assert not torch.allclose(alone[0], alone[1], atol=1e-3)  # the adapters differ, so the check means something
    torch.testing.assert_close(mixed[0:1], alone[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mixed[1:2], alone[1], atol=1e-4, rtol=1e-4)


def _fake_results(swap_ratio=2e-4, t100=0.97, x_raw=1.6, upload_ms=30.0, over_peft=1.2) -> dict:
    point = lambda c, x: {"count": c, "rss": 1 << 30, "per_task": 1000.0 * x if c else None,  # noqa: E731
                          "per_task_x_raw": x if c else None, "bank_rows": 8}
    return {
        "command": ".venv/bin/python bench/serving.py", "date": "2026-01-01T00:00:00+00:00", "wall_s": 60,
        "sizes": {"rounds": 5, "http_rounds": 3, "swap_rounds": 9, "swaps_per_block": 400, "tasks": [1, 100],
                  "http_tasks": [1, 100]},
        "machine": {"cores": 2, "cpu": "x", "torch": "2", "threads": 1, "python": "3", "load_avg_start": [1, 1, 1],
                    "load_avg_end": [1, 1, 1]},
        "engine": {"texts": "t", "batch": 32,
                   "swap": {"swap_us": 10.0, "bytes": 104448,
                            "batches": {"8": {"forward_ms": 50, "ratio": swap_ratio, "tokens": 20}}},
                   "ratio_to_single": {"ours T=1": 1.0, "gather T=100": t100, "swap-only T=100": 0.5,
                                       "peft T=100": 0.8, "copies T=10": 0.5},
                   "throughput": {k: {"median": 10.0} for k in ("ours T=1", "gather T=100", "peft T=100",
                                                                 "gather T=10", "copies T=10")},
                   "ours_over_peft": {"100": over_peft}, "ours_over_copies": {"10": 2.0},
                   "reload": {"throughput": {"ours, swap per batch": {"median": 10}, "reload per batch": {"median": 1}},
                              "ours_over_reload": 10.0}},
        "memory": {"bank": {"raw_bytes_per_task": 1000, "points": [point(0, 0), point(100, x_raw)]}},
        "http": {"concurrency": 64, "requests_per_phase": 128, "store_fill_s": 1, "overhead": 0.8,
                 "ratio_to_single": {"http gather T=1": 1.0, "http gather T=100": 0.99, "http swap-only T=1": 1.0,
                                     "http swap-only T=100": 0.4},
                 "throughput": {"http gather T=1": {"median": 9.0}, "http swap-only T=1": {"median": 9.0}},
                 "latency": {"rate": 4.5, "requests": 300, "p50_ms": 40, "p90_ms": 60, "p99_ms": 90, "max_ms": 99},
                 "upload": {"reps": 10, "predict_ms": 20, "put_ms": 10, "live_ms": upload_ms, "total_ms": 40,
                            "total_max_ms": 50, "predicts_until_live_max": 1, "resident_tasks": 101},
                 "server_rss": {"gather": 1 << 29, "swap-only": 1 << 29, "small": 1 << 29},
                 "ready_s": {"gather": 10, "swap-only": 10, "small": 5}},
    }


@pytest.mark.parametrize(
    "change, goal, verdict",
    [
        ({}, "swap ≤", "met"),
        ({"swap_ratio": 2e-3}, "swap ≤", "missed: 2.00× the limit"),
        ({"t100": 0.76}, "100-task traffic", "missed: 0.80× the goal (20 % short)"),
        ({"x_raw": 1.05}, "memory per task", "met"),
        ({"x_raw": 2.2}, "memory per task", "missed: 2.00× the limit"),
        ({"upload_ms": 100.0}, "upload → live", "missed: 2.00× the limit"),
        ({"over_peft": 3.3}, "≥ 3× PEFT", "met"),
    ],
    ids=["swap-met", "swap-missed", "mixed-missed", "memory-met", "memory-missed", "upload-missed", "peft-met"],
)
def test_verdict_says_met_or_by_how_much_it_missed(change, goal, verdict):
    rows = [v for g, _, v in sr.verdicts(_fake_results(**change)) if g.startswith(goal)]
    assert rows and rows[0] == verdict


def test_markdown_block_replaces_only_its_own_block(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\nhand-written notes\n")
    block = sr.markdown(_fake_results(), "bench/results/serving.png")
    sr.write_block(path, block)
    sr.write_block(path, block.replace("0.990", "0.991"))
    text = path.read_text()
    assert text.count(sr.BEGIN) == 1 and "hand-written notes" in text
    assert "`.venv/bin/python bench/serving.py`" in text and "2 CPU cores" in text and "0.991" in text


def test_render_from_saved_json_prints_the_tables_and_writes_the_plot(tmp_path, capsys):
    import serving

    saved = tmp_path / "serving.json"
    saved.write_text(json.dumps(_fake_results()))
    assert serving.main(["--render", str(saved), "--no-markdown"]) == 0
    assert "### 1. Swap cost" in capsys.readouterr().out
    assert (tmp_path / "serving.png").stat().st_size > 10_000


@pytest.mark.slow
def test_upload_live_benchmark_runs_a_real_server_and_keeps_text_outside_its_block(tmp_path, monkeypatch):
    import upload_live as ul

    out = tmp_path / "upload.json"
    bench_md = tmp_path / "BENCHMARKS.md"
    bench_md.write_text("# notes kept\n\n" + ul.BEGIN + "\nold numbers\n" + ul.END + "\n\ntrailing notes kept\n")
    monkeypatch.setattr(ul, "REPO", tmp_path)
    assert ul.main(["--tasks", "1,3", "--reps", "2", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["tasks"] for r in rows] == [1, 3]
    for r in rows:
        assert 0 < r["put_ms"] < r["total_ms"] and r["one_task_ms"] > 0 and r["ready_s"] >= 0
    text = bench_md.read_text()
    assert text.startswith("# notes kept") and text.rstrip().endswith("trailing notes kept")
    assert "old numbers" not in text and "| 3 |" in text and text.count(ul.BEGIN) == 1
