"""`bitfit compare`: the run plan, the resumable results file, the summary and goals, and one real child run."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import pytest

from bitfit import compare
from bitfit.compare import MEDIUM, MEDIUM_GRIDS, QUICK, Settings, best_runs, load_results, plan, run_all, run_key, summarise
from bitfit.errors import BitfitError

TASKS = list(compare.TASKS)


@pytest.fixture
def fake_glue(tmp_path):
    for folder in compare.TASKS.values():
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "train.tsv").write_text("x\n")
    return tmp_path


def entry(method, task, lr, score, step=1.0, peak=1000, before=400, trainable=10, total=1000, opt=80):
    return {"method": method, "task": task, "lr": lr, "score": score, "metric": "accuracy", "metrics": {"accuracy": score},
            "best_epoch": 1, "steps": 4, "trainable": trainable, "total": total, "share": trainable / total,
            "step_seconds": step, "peak_rss": peak, "rss_before": before, "optimizer_bytes": opt, "torch": "x", "threads": 1}


def test_plan_runs_every_default_learning_rate_before_the_rest_of_the_grid(fake_glue):
    runs = plan(["bitfit", "full"], ["sst2", "rte"], "grid", QUICK, fake_glue)
    keys = [r.key for r in runs]
    assert keys[:4] == ["bitfit/sst2/0.002", "full/sst2/5e-05", "bitfit/rte/0.002", "full/rte/5e-05"]
    assert sorted(keys) == sorted({run_key(m, t, lr) for m, lrs in (("bitfit", (1e-3, 2e-3, 5e-3)), ("full", (2e-5, 5e-5, 1e-4)))
                                   for t in ("sst2", "rte") for lr in lrs})


@pytest.mark.parametrize("lrs,expected", [("default", [2e-3]), ([0.1, 0.2], [0.1, 0.2])], ids=["default", "explicit"])
def test_plan_learning_rates(lrs, expected, fake_glue):
    assert sorted(r.lr for r in plan(["bitfit"], ["mrpc"], lrs, QUICK, fake_glue)) == expected


@pytest.mark.parametrize("tasks,message", [(["sst2", "mnli"], "unknown task.*mnli"), (["qqp"], "unknown task")], ids=["mnli", "qqp"])
def test_plan_refuses_unknown_tasks(tasks, message, fake_glue):
    with pytest.raises(BitfitError, match=message):
        plan(["bitfit"], tasks, "default", QUICK, fake_glue)


def test_plan_refuses_missing_glue_data(tmp_path):
    with pytest.raises(BitfitError, match=r"\['RTE'\] not found"):
        plan(["bitfit"], ["rte"], "default", QUICK, tmp_path)


def test_plan_refuses_unknown_method(fake_glue):
    with pytest.raises(ValueError, match="unknown method 'adapter'"):
        plan(["adapter"], ["rte"], "default", QUICK, fake_glue)


def test_rerun_resumes_and_retries_only_what_failed(fake_glue, tmp_path, monkeypatch):
    calls, crashed = [], set()

    def fake_child(spec, log_path=None, timeout=None):
        calls.append(spec.key)
        if spec.method == "full" and spec.key not in crashed:  # each full run crashes once
            crashed.add(spec.key)
            raise BitfitError("child exited with -9")
        return entry(spec.method, spec.task, spec.lr, 0.5)

    monkeypatch.setattr(compare, "run_in_child", fake_child)
    path = tmp_path / "results.json"
    runs = plan(["bitfit", "full"], ["sst2", "rte"], "default", QUICK, fake_glue)
    first = run_all(runs, path, echo=lambda *_: None)
    assert sorted(first["runs"]) == ["bitfit/rte/0.002", "bitfit/sst2/0.002"]
    assert sorted(first["failed"]) == ["full/rte/5e-05", "full/sst2/5e-05"]
    assert json.loads(path.read_text()) == first
    calls.clear()
    second = run_all(runs, path, echo=lambda *_: None)
    assert sorted(calls) == ["full/rte/5e-05", "full/sst2/5e-05"]
    assert len(second["runs"]) == 4 and second["failed"] == {}
    assert not list(tmp_path.glob(".results.json.*")), "no temporary file left behind"


def test_a_preset_grid_replaces_the_methods_grids_and_its_first_value_is_tried_first(fake_glue):
    runs = plan(["bitfit", "head"], ["sst2", "rte"], "grid", MEDIUM, fake_glue, grids=MEDIUM_GRIDS)
    keys = [r.key for r in runs]
    assert keys[:4] == ["bitfit/sst2/0.005", "head/sst2/0.01", "bitfit/rte/0.005", "head/rte/0.01"]
    assert sorted({r.lr for r in runs if r.method == "bitfit"}) == sorted(MEDIUM_GRIDS["bitfit"])
    defaults = plan(["bitfit"], ["sst2"], "default", MEDIUM, fake_glue, grids=MEDIUM_GRIDS)
    assert [r.lr for r in defaults] == [MEDIUM_GRIDS["bitfit"][0]]


def test_parallel_jobs_record_every_run_once_like_one_job(fake_glue, tmp_path, monkeypatch):
    import threading
    import time

    running, most = set(), 0
    guard = threading.Lock()

    def fake_child(spec, log_path=None, timeout=None):
        nonlocal most
        with guard:
            running.add(spec.key)
            most = max(most, len(running))
        time.sleep(0.02)
        with guard:
            running.discard(spec.key)
        if spec.key == "full/rte/5e-05":
            raise BitfitError("child exited with -9")
        return entry(spec.method, spec.task, spec.lr, 0.5)

    monkeypatch.setattr(compare, "run_in_child", fake_child)
    runs = plan(["bitfit", "full", "head"], TASKS, "default", QUICK, fake_glue)
    serial = run_all(runs, tmp_path / "one.json", echo=lambda *_: None)
    parallel = run_all(runs, tmp_path / "three.json", echo=lambda *_: None, jobs=3)
    assert most == 3, "three runs were in flight at once"
    assert parallel["runs"] == serial["runs"] and len(parallel["runs"]) == len(runs) - 1
    assert list(parallel["failed"]) == ["full/rte/5e-05"]
    assert json.loads((tmp_path / "three.json").read_text()) == parallel


def test_results_made_with_other_settings_are_refused_and_left_unchanged(tmp_path):
    path = tmp_path / "results.json"
    results = load_results(path, QUICK)
    results["runs"]["bitfit/rte/0.002"] = entry("bitfit", "rte", 2e-3, 0.6)
    compare.save_results(results, path)
    before = path.read_bytes()
    with pytest.raises(BitfitError, match="other --results file|another --results file"):
        load_results(path, replace(QUICK, epochs=5))
    assert path.read_bytes() == before


def test_best_run_is_chosen_per_method_and_task_on_dev():
    results = {"runs": {
        "a": entry("bitfit", "rte", 1e-3, 0.60), "b": entry("bitfit", "rte", 2e-3, 0.65), "c": entry("bitfit", "rte", 5e-3, 0.65),
        "d": entry("full", "rte", 5e-5, 0.70),
    }}
    best = best_runs(results)
    assert best[("bitfit", "rte")]["lr"] == 2e-3, "ties go to the smaller learning rate"
    assert best[("full", "rte")]["score"] == 0.70


def full_table():
    runs = {}
    for t in TASKS:
        runs[f"full/{t}"] = entry("full", t, 5e-5, 0.80, step=2.0, peak=2000, trainable=1000, opt=8000)
        runs[f"bitfit/{t}"] = entry("bitfit", t, 2e-3, 0.79, step=1.0, peak=1000, trainable=1)
        runs[f"random/{t}"] = entry("random", t, 2e-3, 0.70, step=2.2, peak=2400, trainable=1)
    runs["bitfit/sst2"] = entry("bitfit", "sst2", 2e-3, 0.77, step=1.0, peak=1000, trainable=1)
    return {"settings": asdict(Settings()), "runs": runs, "failed": {}}


def test_summary_averages_the_tasks_and_checks_the_goals():
    summary = summarise(full_table())
    rows = summary["rows"]
    assert summary["methods"] == ["full", "bitfit", "random"]
    assert rows["full"]["average"] == pytest.approx(80.0)
    assert rows["bitfit"]["average"] == pytest.approx((77 + 4 * 79) / 5)
    goals = {g["goal"].split(" ")[1]: g for g in summary["goals"]}
    verdicts = [(g["value"], g["met"]) for g in summary["goals"]]
    assert verdicts[0] == (pytest.approx(-3.0), False)  # SST-2: 77 vs 80
    assert verdicts[1] == (pytest.approx(78.6 / 80), True)
    assert verdicts[2][1] is True  # random 70 vs BitFit 78.6
    assert verdicts[3] == (pytest.approx(0.5), True)
    assert verdicts[4] == (pytest.approx(0.5), True)
    assert goals


def test_summary_of_an_unfinished_method_has_no_average_and_pending_goals():
    results = full_table()
    del results["runs"]["full/cola"]
    summary = summarise(results)
    assert summary["rows"]["full"]["average"] is None
    assert summary["goals"][1]["met"] is None


def test_report_writes_the_tables_and_the_plot(tmp_path):
    from bitfit_cli.compare import plot, render_markdown

    results = full_table()
    summary = summarise(results)
    text = render_markdown(summary, results)
    assert "| bitfit | 1 | 0.100 | 77.0 | 79.0 |" in text
    assert "BitFit SST-2 ≥ full FT − 1.5 points: -3.00 points — **missed**" in text
    png = tmp_path / "plot.png"
    plot(summary, png, title="test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_one_real_run_in_a_child_process_measures_its_own_costs(glue_dir, tmp_path):
    settings = Settings(epochs=1, max_train=32, max_dev=32, batch_size=16, max_length=32, threads=1)
    spec = compare.RunSpec("bitfit", "rte", 2e-3, settings, str(glue_dir))
    e = compare.run_in_child(spec, tmp_path / "child.log", timeout=300)
    assert (e["method"], e["task"], e["metric"], e["steps"], e["train_examples"], e["dev_examples"]) == (
        "bitfit", "rte", "accuracy", 2, 32, 32)
    assert 0.0 <= e["score"] <= 1.0 and e["score"] == e["metrics"]["accuracy"]
    assert e["trainable"] == 26_112 + 2 * 384 + 2  # MiniLM's bias scalars and a two-way head
    assert e["share"] == pytest.approx(e["trainable"] / e["total"]) and e["total"] > 22_000_000
    # AdamW keeps two float32 moments per trained scalar that got a gradient (the unused pooler's bias gets none)
    assert 8 * (e["trainable"] - 384) <= e["optimizer_bytes"] <= 8 * e["trainable"] + 4 * 60
    assert e["peak_rss"] >= e["rss_before"] > 100 * 2**20 and e["step_seconds"] > 0
    assert e["threads"] == 1


def test_compare_refuses_a_job_count_below_one_and_writes_nothing(fake_glue, tmp_path, capsys):
    from bitfit_cli.main import main

    results = tmp_path / "out" / "results.json"
    assert main(["compare", "--jobs", "0", "--glue", str(fake_glue), "--results", str(results)]) == 2
    assert "--jobs must be at least 1, not 0" in capsys.readouterr().err
    assert not results.parent.exists()
