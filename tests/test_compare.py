"""`bitfit compare`: the run plan (learning rates chosen on held-out train, seeds), the resumable results file,
the summary with standard errors, the goals, the device option, and real child runs."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch

from bitfit import compare
from bitfit.compare import FULL, FULL_GRIDS, MEDIUM, MEDIUM_GRIDS, QUICK, Settings, load_results, make_plan, plan, run_all, run_key
from bitfit.compare_child import holdout
from bitfit.compare_summary import cells, decode, metric_resampled, summarise
from bitfit.errors import BitfitError

TASKS = list(compare.TASKS)
QUIET = dict(echo=lambda *_: None)


@pytest.fixture
def fake_glue(tmp_path):
    for folder in compare.TASKS.values():
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "train.tsv").write_text("x\n")
    return tmp_path


def entry(method, task, lr, score, step=1.0, peak=1000, before=400, trainable=10, total=1000, opt=80, seed=0,
          stage="final", pred=None, gold=None):
    e = {"method": method, "task": task, "lr": lr, "score": score, "metric": "accuracy", "metrics": {"accuracy": score},
         "best_epoch": 1, "steps": 4, "trainable": trainable, "total": total, "share": trainable / total, "seed": seed,
         "stage": stage, "step_seconds": step, "peak_rss": peak, "rss_before": before, "optimizer_bytes": opt,
         "torch": "x", "threads": 1, "dev_examples": 100}
    if pred is not None:
        e |= {"dev_pred": pred, "dev_gold": gold}
    return e


# --- the plan ----------------------------------------------------------------------------------


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


@pytest.mark.parametrize("seeds", [{"rte": 0}, {"qnli": 2}], ids=["zero-seeds", "unknown-task"])
def test_plan_refuses_bad_seed_counts(seeds, fake_glue):
    with pytest.raises(BitfitError, match="seeds"):
        plan(["bitfit"], ["rte"], "default", QUICK, fake_glue, seeds=seeds)


def test_a_preset_grid_replaces_the_methods_grids_and_its_first_value_is_tried_first(fake_glue):
    runs = plan(["bitfit", "head"], ["sst2", "rte"], "grid", MEDIUM, fake_glue, grids=MEDIUM_GRIDS)
    keys = [r.key for r in runs]
    assert keys[:4] == ["bitfit/sst2/0.005", "head/sst2/0.01", "bitfit/rte/0.005", "head/rte/0.01"]
    assert sorted({r.lr for r in runs if r.method == "bitfit"}) == sorted(MEDIUM_GRIDS["bitfit"])
    defaults = plan(["bitfit"], ["sst2"], "default", MEDIUM, fake_glue, grids=MEDIUM_GRIDS)
    assert [r.lr for r in defaults] == [MEDIUM_GRIDS["bitfit"][0]]


def test_extra_seeds_have_their_own_keys_and_come_after_every_first_seed(fake_glue):
    runs = plan(["bitfit", "full"], ["rte", "sst2"], "default", QUICK, fake_glue, seeds={"rte": 3})
    assert [r.key for r in runs] == ["bitfit/rte/0.002", "full/rte/5e-05", "bitfit/sst2/0.002", "full/sst2/5e-05",
                                     "bitfit/rte/0.002/seed1", "bitfit/rte/0.002/seed2", "full/rte/5e-05/seed1",
                                     "full/rte/5e-05/seed2"]
    assert [r.run_seed for r in runs if r.task == "rte" and r.method == "bitfit"] == [0, 1, 2]


def held_out_plan(fake_glue, methods=("bitfit", "full", "head"), seeds=None):
    return make_plan(list(methods), ["sst2", "rte"], "grid", FULL, fake_glue, grids=FULL_GRIDS, seeds=seeds)


def test_with_a_held_out_share_only_selection_runs_are_known_until_they_have_scores(fake_glue):
    p = held_out_plan(fake_glue)
    runs = p.runs({})
    assert {r.stage for r in runs} == {"select"}
    assert [r.key for r in runs[:3]] == ["select/bitfit/sst2/0.002", "select/full/sst2/5e-05", "select/head/sst2/0.002"]
    assert len(runs) == 2 * 3 * 2  # two candidates per method on each task


def test_a_final_run_takes_the_learning_rate_that_scored_best_on_the_held_out_slice(fake_glue):
    p = held_out_plan(fake_glue, methods=("bitfit", "full"), seeds={"rte": 2})
    scores = {("bitfit", 2e-3): 0.7, ("bitfit", 5e-3): 0.8, ("full", 5e-5): 0.6, ("full", 1e-4): 0.6}  # full: a tie
    done = {"runs": {}}
    for (m, lr), s in scores.items():
        for task in ("sst2", "rte"):
            spec = p.spec(m, task, lr, stage="select")
            done["runs"][spec.key] = entry(m, task, lr, s, stage="select")
    finals = [r for r in p.runs(done) if r.stage == "final"]
    assert [r.key for r in finals] == ["bitfit/sst2/0.005", "full/sst2/5e-05", "bitfit/rte/0.005", "full/rte/5e-05",
                                       "bitfit/rte/0.005/seed1", "full/rte/5e-05/seed1"]  # ties: the smaller lr


def test_a_method_with_one_candidate_needs_no_selection(fake_glue):
    p = make_plan(["bitfit"], ["rte"], [3e-3], FULL, fake_glue)
    assert [r.key for r in p.runs({})] == ["bitfit/rte/0.003"]


def test_the_held_out_slice_is_fixed_disjoint_and_a_tenth():
    examples = list(range(1000))
    rest, held = holdout(examples, 0.1)
    assert len(held) == 100 and set(rest).isdisjoint(held) and sorted(rest + held) == examples
    assert holdout(examples, 0.1) == (rest, held)


# --- the results file and the runner ------------------------------------------------------------


def fake_child_from(scores=None, calls=None, crash=()):
    def fake_child(spec, log_path=None, timeout=None):
        if calls is not None:
            calls.append(spec.key)
        if spec.key in crash:
            crash.discard(spec.key) if isinstance(crash, set) else None
            raise BitfitError("child exited with -9")
        score = (scores or {}).get((spec.method, spec.lr, spec.stage), 0.5)
        return entry(spec.method, spec.task, spec.lr, score, seed=spec.run_seed, stage=spec.stage)

    return fake_child


def test_rerun_resumes_and_retries_only_what_failed(fake_glue, tmp_path, monkeypatch):
    calls = []
    crash = {"full/sst2/5e-05", "full/rte/5e-05"}  # each crashes once
    monkeypatch.setattr(compare, "run_in_child", fake_child_from(calls=calls, crash=crash))
    path = tmp_path / "results.json"
    runs = plan(["bitfit", "full"], ["sst2", "rte"], "default", QUICK, fake_glue)
    first = run_all(runs, path, **QUIET)
    assert sorted(first["runs"]) == ["bitfit/rte/0.002", "bitfit/sst2/0.002"]
    assert sorted(first["failed"]) == ["full/rte/5e-05", "full/sst2/5e-05"]
    assert json.loads(path.read_text()) == first
    calls.clear()
    second = run_all(runs, path, **QUIET)
    assert sorted(calls) == ["full/rte/5e-05", "full/sst2/5e-05"]
    assert len(second["runs"]) == 4 and second["failed"] == {}
    assert not list(tmp_path.glob(".results.json.*")), "no temporary file left behind"


@pytest.mark.parametrize("jobs", [1, 2], ids=["one-job", "two-jobs"])
def test_a_plan_runs_selection_then_finals_then_extra_seeds_in_one_invocation(jobs, fake_glue, tmp_path, monkeypatch):
    scores = {("bitfit", 5e-3, "select"): 0.9, ("full", 1e-4, "select"): 0.9}
    monkeypatch.setattr(compare, "run_in_child", fake_child_from(scores))
    p = held_out_plan(fake_glue, methods=("bitfit", "full"), seeds={"rte": 2})
    results = run_all(p, tmp_path / "r.json", jobs=jobs, **QUIET)
    finals = sorted(k for k, e in results["runs"].items() if e["stage"] == "final")
    assert finals == ["bitfit/rte/0.005", "bitfit/rte/0.005/seed1", "bitfit/sst2/0.005", "full/rte/0.0001",
                      "full/rte/0.0001/seed1", "full/sst2/0.0001"]
    assert len(results["runs"]) == 8 + 6 and results["failed"] == {}


def test_a_failed_selection_run_holds_back_only_its_own_final(fake_glue, tmp_path, monkeypatch):
    monkeypatch.setattr(compare, "run_in_child", fake_child_from(crash={"select/full/rte/0.0001"}))
    results = run_all(held_out_plan(fake_glue, methods=("bitfit", "full")), tmp_path / "r.json", **QUIET)
    finals = sorted(k for k, e in results["runs"].items() if e["stage"] == "final")
    assert finals == ["bitfit/rte/0.002", "bitfit/sst2/0.002", "full/sst2/5e-05"]
    assert list(results["failed"]) == ["select/full/rte/0.0001"]


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
    serial = run_all(runs, tmp_path / "one.json", **QUIET)
    parallel = run_all(runs, tmp_path / "three.json", jobs=3, **QUIET)
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


def test_a_file_written_before_the_selection_settings_existed_still_resumes_with_their_defaults(tmp_path):
    path = tmp_path / "old.json"
    old = {k: v for k, v in asdict(MEDIUM).items() if not k.startswith("select") and k != "keep"}
    path.write_text(json.dumps({"format": compare.RESULTS_FORMAT, "version": 1, "settings": old, "runs": {}, "failed": {}}))
    assert load_results(path, MEDIUM)["settings"] == old
    with pytest.raises(BitfitError, match="settings"):
        load_results(path, replace(MEDIUM, keep="last"))


# --- the summary --------------------------------------------------------------------------------


def preds(rng, n, accuracy, gold=None):
    """Stored predictions right on a share `accuracy` of a dev set (one drawn unless `gold` is given)."""
    gold = rng.integers(0, 2, n) if gold is None else decode(gold)
    pred = np.where(rng.random(n) < accuracy, gold, 1 - gold)
    return "".join(map(str, pred)), "".join(map(str, gold))


@pytest.mark.parametrize("metric", ["accuracy", "f1", "matthews", "pearson"], ids=str)
def test_resampled_metrics_equal_the_training_metrics_on_the_unresampled_dev_set(metric):
    from bitfit import metrics as m

    rng = np.random.default_rng(0)
    gold = rng.random(200) if metric == "pearson" else rng.integers(0, 2, 200)
    pred = gold + rng.normal(0, 0.5, 200) if metric == "pearson" else np.where(rng.random(200) < 0.8, gold, 1 - gold)
    expected = getattr(m, metric)(torch.tensor(pred), torch.tensor(gold))
    got = metric_resampled(metric, pred, gold, np.arange(200)[None, :])
    torch.testing.assert_close(torch.tensor(got[0]), torch.tensor(expected, dtype=torch.float64))


def test_the_bootstrap_se_of_an_accuracy_is_close_to_the_binomial_one():
    rng = np.random.default_rng(1)
    pred, gold = preds(rng, 800, 0.8)
    results = {"runs": {"a": entry("bitfit", "sst2", 2e-3, float(np.mean(decode(pred) == decode(gold))), pred=pred, gold=gold)}}
    c = summarise(results)["rows"]["bitfit"]["cells"]["sst2"]
    p = c["score"] / 100
    assert c["se"] == pytest.approx(100 * np.sqrt(p * (1 - p) / 800), rel=0.1)


def test_a_paired_difference_of_two_similar_methods_has_a_smaller_se_than_either_score():
    rng = np.random.default_rng(2)
    pred, gold = preds(rng, 872, 0.85)
    other = "".join(c if rng.random() > 0.03 else str(1 - int(c)) for c in pred)  # disagrees on 3 % of examples
    acc = lambda p: float(np.mean(decode(p) == decode(gold)))  # noqa: E731
    results = {"runs": {"f": entry("full", "sst2", 5e-5, acc(pred), pred=pred, gold=gold),
                        "b": entry("bitfit", "sst2", 2e-3, acc(other), pred=other, gold=gold)}}
    summary = summarise(results)
    sst = summary["goals"][0]
    assert sst["value"] == pytest.approx(100 * (acc(other) - acc(pred)))
    # a paired difference varies only through the examples where the two disagree: SE ≈ sqrt(share disagreeing / n)
    disagree = float(np.mean(decode(pred) != decode(other)))
    assert sst["se"] == pytest.approx(100 * np.sqrt(disagree / 872), rel=0.15)
    assert sst["se"] < 0.6 * summary["rows"]["full"]["cells"]["sst2"]["se"]


def full_table(with_preds=False):
    rng = np.random.default_rng(3)
    runs = {}
    for t in TASKS:
        gold = preds(rng, 400, 1.0)[1]  # one dev set per task, shared by every method
        for m, acc, step, peak, trainable, opt in (("full", 0.80, 2.0, 2000, 1000, 8000), ("bitfit", 0.79, 1.0, 1000, 1, 80),
                                                     ("random", 0.70, 2.2, 2400, 1, 8000)):
            acc = 0.77 if (m, t) == ("bitfit", "sst2") else acc
            p, g = preds(rng, 400, acc, gold) if with_preds else (None, None)
            runs[f"{m}/{t}"] = entry(m, t, 2e-3, acc, step=step, peak=peak, trainable=trainable, opt=opt, pred=p, gold=g)
    return {"settings": asdict(Settings()), "runs": runs, "failed": {}}


def test_summary_averages_the_tasks_and_checks_the_goals():
    summary = summarise(full_table())
    rows = summary["rows"]
    assert summary["methods"] == ["full", "bitfit", "random"]
    assert rows["full"]["average"] == pytest.approx(80.0)
    assert rows["bitfit"]["average"] == pytest.approx((77 + 4 * 79) / 5)
    assert rows["bitfit"]["pct_full"] == pytest.approx(100 * 78.6 / 80)
    verdicts = [(g["value"], g["met"]) for g in summary["goals"]]
    assert verdicts[0] == (pytest.approx(-3.0), False)  # SST-2: 77 vs 80
    assert verdicts[1] == (pytest.approx(78.6 / 80), True)
    assert verdicts[2][1] is True  # random 70 vs BitFit 78.6
    assert verdicts[3] == (pytest.approx(0.5), True)
    assert verdicts[4] == (pytest.approx(0.5), True)


def test_every_cell_and_average_gets_a_standard_error_from_stored_predictions():
    summary = summarise(full_table(with_preds=True))
    for m, row in summary["rows"].items():
        assert all(0.5 < c["se"] < 5 for c in row["cells"].values()), m
        assert 0.2 < row["average_se"] < row["cells"]["sst2"]["se"], "five independent dev sets shrink the average's SE"
    assert all(g["se"] is not None for g in summary["goals"][:3])


def test_summary_of_an_unfinished_method_has_no_average_and_pending_goals():
    results = full_table()
    del results["runs"]["full/cola"]
    summary = summarise(results)
    assert summary["rows"]["full"]["average"] is None
    assert summary["goals"][1]["met"] is None


def test_the_reported_lr_is_the_held_out_choice_even_where_another_scored_higher_on_dev():
    runs = {"s1": entry("bitfit", "rte", 2e-3, 0.60, stage="select"), "s2": entry("bitfit", "rte", 5e-3, 0.55, stage="select"),
            "f1": entry("bitfit", "rte", 2e-3, 0.58), "f2": entry("bitfit", "rte", 5e-3, 0.66),
            "f3": entry("bitfit", "rte", 2e-3, 0.62, seed=1)}
    c = cells({"runs": runs})[("bitfit", "rte")]
    assert (c["lr"], c["chosen_on"]) == (2e-3, "held-out train")
    assert c["seed_scores"] == [pytest.approx(58), pytest.approx(62)] and c["score"] == pytest.approx(60)


def test_without_selection_runs_the_best_mean_over_seeds_on_dev_is_reported():
    runs = {"a": entry("full", "rte", 5e-5, 0.70), "b": entry("full", "rte", 5e-5, 0.50, seed=1),
            "c": entry("full", "rte", 1e-4, 0.65), "d": entry("full", "rte", 1e-4, 0.63, seed=1)}
    c = cells({"runs": runs})[("full", "rte")]
    assert (c["lr"], c["chosen_on"], c["score"]) == (1e-4, "dev", pytest.approx(64))


def test_a_single_given_lr_is_reported_as_given_not_as_chosen_on_dev():
    from bitfit_cli.compare_report import render_markdown

    results = {"runs": {"a": entry("bitfit", "cola", 5e-3, 0.0)}, "settings": {"keep": "last"}}
    c = cells(results)[("bitfit", "cola")]
    assert (c["lr"], c["chosen_on"]) == (5e-3, "given")
    text = render_markdown(summarise(results), results)
    assert "Learning rate given by --lrs (one candidate, nothing chosen)" in text and "chosen on dev" not in text


def test_costs_come_from_a_separate_run_when_one_is_given():
    costs = {"runs": {"f": entry("full", "sst2", 5e-5, 0.5, step=3.0, peak=3000), "b": entry("bitfit", "sst2", 2e-3, 0.5, step=1.2, peak=1500),
                      "f2": entry("full", "rte", 5e-5, 0.5, step=4.0, peak=4000), "b2": entry("bitfit", "rte", 2e-3, 0.5, step=2.0, peak=2000)}}
    summary = summarise(full_table(), costs)
    assert summary["costs"]["bitfit"]["step_seconds_ratio"] == pytest.approx((0.4 + 0.5) / 2)
    assert summary["goals"][3]["value"] == pytest.approx(0.45) and summary["goals"][4]["value"] == pytest.approx(0.5)


def test_report_writes_the_tables_and_the_plot(tmp_path):
    from bitfit_cli.compare_report import plot, render_markdown

    results = full_table(with_preds=True)
    summary = summarise(results)
    text = render_markdown(summary, results)
    assert "| bitfit | 1 | 0.100 | 77." in text and " ± " in text
    assert "BitFit SST-2 ≥ full FT − 1.5 points: " in text and "— **missed**" in text
    results["runs"] |= {"s1": entry("bitfit", "rte", 2e-3, 0.61, stage="select") | {"train_examples": 1000},
                        "s2": entry("bitfit", "rte", 5e-3, 0.58, stage="select") | {"train_examples": 1000}}
    assert "| bitfit | **0.002: 61.0**, 0.005: 58.0 |" in render_markdown(summarise(results), results)
    png = tmp_path / "plot.png"
    plot(summary, png, title="test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- the command line and the device ------------------------------------------------------------


def test_compare_refuses_a_job_count_below_one_and_writes_nothing(fake_glue, tmp_path, capsys):
    from bitfit_cli.main import main

    results = tmp_path / "out" / "results.json"
    assert main(["compare", "--jobs", "0", "--glue", str(fake_glue), "--results", str(results)]) == 2
    assert "--jobs must be at least 1, not 0" in capsys.readouterr().err
    assert not results.parent.exists()


@pytest.mark.parametrize("seeds", ["rte=x", "two"], ids=["bad-count", "not-a-number"])
def test_compare_refuses_bad_seeds_and_writes_nothing(seeds, fake_glue, tmp_path, capsys):
    from bitfit_cli.main import main

    results = tmp_path / "out" / "results.json"
    assert main(["compare", "--seeds", seeds, "--glue", str(fake_glue), "--results", str(results)]) == 2
    assert "--seeds must be N or TASK=N" in capsys.readouterr().err
    assert not results.parent.exists()


def test_compare_refuses_bad_learning_rates_and_writes_nothing(fake_glue, tmp_path, capsys):
    from bitfit_cli.main import main

    results = tmp_path / "out" / "results.json"
    assert main(["compare", "--lrs", "1e-3,fast", "--glue", str(fake_glue), "--results", str(results)]) == 2
    assert "--lrs must be 'default', 'grid' or comma-separated numbers, not '1e-3,fast'" in capsys.readouterr().err
    assert not results.parent.exists()


@pytest.mark.parametrize(("lrs", "waiting"), [("grid", 2), ("0.005", 0)], ids=["grid", "one-lr"])
def test_dry_run_counts_only_the_finals_that_wait_for_a_selection(lrs, waiting, fake_glue, tmp_path, capsys):
    from bitfit_cli.main import main

    results = tmp_path / "results.json"
    assert main(["compare", "--preset", "full", "--methods", "bitfit", "--tasks", "rte,mrpc", "--lrs", lrs,
                 "--dry-run", "--glue", str(fake_glue), "--results", str(results)]) == 0
    assert f"\n{waiting} (method, task) finals wait for their learning-rate selection" in capsys.readouterr().out
    assert not results.exists()


def test_the_device_option_reaches_every_planned_run_and_the_child_payload(fake_glue):
    p = make_plan(["bitfit", "lora"], ["rte"], "grid", FULL, fake_glue, grids=FULL_GRIDS, device="cuda:1")
    assert {r.device for r in p.runs({})} == {"cuda:1"}
    assert json.loads(json.dumps(asdict(p.runs({})[0])))["device"] == "cuda:1"


def test_a_device_this_torch_cannot_use_is_refused_by_the_child_with_the_reason(glue_dir, tmp_path):
    """The real child process gets the device and says why it cannot train there (a CUDA-less torch here;
    on a GPU machine, an ordinal past its last GPU)."""
    spec = compare.RunSpec("bitfit", "rte", 2e-3, QUICK, str(glue_dir), device="cuda:99")
    with pytest.raises(BitfitError, match=r"--device cuda:99: "):
        compare.run_in_child(spec, tmp_path / "child.log", timeout=120)


def test_compare_refuses_a_device_it_cannot_use_before_writing_anything(glue_dir, tmp_path, capsys):
    from bitfit_cli.main import main

    results = tmp_path / "out" / "results.json"
    assert main(["compare", "--device", "cuda:99", "--glue", str(glue_dir), "--results", str(results)]) == 2
    assert "--device cuda:99: " in capsys.readouterr().err
    assert not results.parent.exists()


# --- real child runs (the packaged MiniLM, real GLUE data) --------------------------------------


@pytest.mark.slow
def test_one_real_run_in_a_child_process_measures_its_own_costs_and_keeps_its_predictions(glue_dir, tmp_path):
    settings = Settings(epochs=1, max_train=32, max_dev=32, batch_size=16, max_length=32, threads=1)
    spec = compare.RunSpec("bitfit", "rte", 2e-3, settings, str(glue_dir))
    e = compare.run_in_child(spec, tmp_path / "child.log", timeout=300)
    assert (e["method"], e["task"], e["metric"], e["steps"], e["train_examples"], e["dev_examples"]) == (
        "bitfit", "rte", "accuracy", 2, 32, 32)
    assert 0.0 <= e["score"] <= 1.0 and e["score"] == e["metrics"]["accuracy"] == e["history"][-1]["accuracy"]
    assert e["score"] == pytest.approx(float(np.mean(decode(e["dev_pred"]) == decode(e["dev_gold"]))))
    assert e["trainable"] == 26_112 + 2 * 384 + 2  # MiniLM's bias scalars and a two-way head
    assert e["share"] == pytest.approx(e["trainable"] / e["total"]) and e["total"] > 22_000_000
    # AdamW keeps two float32 moments per trained scalar that got a gradient (the unused pooler's bias gets none)
    assert 8 * (e["trainable"] - 384) <= e["optimizer_bytes"] <= 8 * e["trainable"] + 4 * 60
    assert e["peak_rss"] >= e["rss_before"] > 100 * 2**20 and e["step_seconds"] > 0 and e["step_cpu_seconds"] > 0
    assert (e["threads"], e["device"], e["stage"]) == (1, "cpu", "final")


@pytest.mark.slow
def test_a_real_selection_run_trains_and_scores_inside_the_train_split(glue_dir, tmp_path):
    from bitfit.data import load_task, subset

    settings = replace(FULL, select_train=32, select_dev=24, max_length=32)
    spec = compare.RunSpec("ia3", "rte", 3e-3, settings, str(glue_dir), stage="select")
    e = compare.run_in_child(spec, tmp_path / "child.log", timeout=300)
    assert (e["stage"], e["train_examples"], e["dev_examples"], e["steps"], e["best_epoch"]) == ("select", 32, 24, 1, 1)
    data = load_task(glue_dir / "RTE")
    _, held = holdout(data.train, 0.1)
    assert e["dev_gold"] == "".join(str(x.label) for x in subset(held, 24, 0))
    assert e["trainable"] == 6 * (384 + 384 + 1536) + 2 * 384 + 2  # (IA)^3 vectors and the head
