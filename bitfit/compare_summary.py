"""The comparison's results file turned into numbers: a score with a standard error per method and task,
averages, percentages of full fine-tuning, paired differences, costs, and the goals.

Standard errors come from the bootstrap over dev examples: one set of resampled dev indices per task, shared
by every method (so a difference between two methods on one task is paired), the mean over a run's seeds
taken inside each resample. The spread over seeds is reported beside it, not mixed into it. Runs made
before dev predictions were stored get the binomial SE for accuracy and none for the other metrics.
"""

from __future__ import annotations

import math

import numpy as np

from bitfit.compare import METHOD_ORDER, TASKS, chosen_lr

BOOTSTRAP = 1000


# ---------------------------------------------------------------------------------------------
# Metrics over many resamples at once: pred and gold (n,), idx (B, n) -> (B,)


def _counts(pred, gold, idx):
    p, g = pred[idx], gold[idx]
    tp = ((p == 1) & (g == 1)).sum(1).astype(float)
    tn = ((p == 0) & (g == 0)).sum(1).astype(float)
    fp = ((p == 1) & (g == 0)).sum(1).astype(float)
    fn = ((p == 0) & (g == 1)).sum(1).astype(float)
    return tp, tn, fp, fn


def _safe_div(a, b):
    return np.divide(a, b, out=np.zeros_like(a), where=b != 0)


def metric_resampled(metric: str, pred: np.ndarray, gold: np.ndarray, idx: np.ndarray) -> np.ndarray:
    if metric == "accuracy":
        return (pred[idx] == gold[idx]).mean(1)
    if metric == "f1":
        tp, _, fp, fn = _counts(pred, gold, idx)
        return _safe_div(2 * tp, 2 * tp + fp + fn)
    if metric == "matthews":
        tp, tn, fp, fn = _counts(pred, gold, idx)
        return _safe_div(tp * tn - fp * fn, np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
    if metric == "pearson":
        x, y = pred[idx], gold[idx]
        x, y = x - x.mean(1, keepdims=True), y - y.mean(1, keepdims=True)
        return _safe_div((x * y).sum(1), np.sqrt((x * x).sum(1) * (y * y).sum(1)))
    raise ValueError(f"no resampled form of metric {metric!r}")


def decode(values) -> np.ndarray:
    """A run's stored dev predictions or gold labels: a string of class digits, or a list of scores."""
    if isinstance(values, str):
        return np.frombuffer(values.encode(), dtype=np.uint8) - ord("0")
    return np.asarray(values, dtype=float)


def resample_indices(n: int, task: str, b: int = BOOTSTRAP) -> np.ndarray:
    seed = sum(map(ord, task))  # fixed per task, so a regenerated report gives the same SEs
    return np.random.default_rng(seed).integers(0, n, size=(b, n))


# ---------------------------------------------------------------------------------------------
# Cells: one (method, task)


def _final(entry: dict) -> bool:
    return entry.get("stage", "final") == "final"


def cells(results: dict) -> dict[tuple[str, str], dict]:
    """(method, task) -> the reported runs: at the learning rate chosen on held-out train where selection runs
    exist, else at the best mean dev score over seeds (ties: the smaller lr), or at the only lr run ("given");
    every seed run at it."""
    finals: dict[tuple[str, str], dict[float, list[dict]]] = {}
    selects: dict[tuple[str, str], list[dict]] = {}
    for e in results["runs"].values():
        key = (e["method"], e["task"])
        if _final(e):
            finals.setdefault(key, {}).setdefault(e["lr"], []).append(e)
        else:
            selects.setdefault(key, []).append(e)
    out = {}
    for key, by_lr in finals.items():
        if key in selects:
            lr, chosen_on = chosen_lr(selects[key]), "held-out train"
            if lr not in by_lr:
                continue  # its final run has not finished
        elif len(by_lr) == 1:
            lr, chosen_on = next(iter(by_lr)), "given"  # one candidate: nothing was chosen, on dev or elsewhere
        else:
            lr = max(by_lr, key=lambda v: (_mean([e["score"] for e in by_lr[v]]), -v))
            chosen_on = "dev"
        runs = sorted(by_lr[lr], key=lambda e: e.get("seed", 0))
        out[key] = {
            "method": key[0], "task": key[1], "lr": lr, "chosen_on": chosen_on, "runs": runs,
            "metric": runs[0]["metric"], "score": 100 * _mean([e["score"] for e in runs]),
            "seed_scores": [100 * e["score"] for e in runs],
            "lrs_tried": sorted({e["lr"] for e in selects.get(key, [])} | set(by_lr)),
            "select_scores": {e["lr"]: 100 * e["score"] for e in selects.get(key, [])},
        }
    return out


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def attach_bootstrap(table: dict[tuple[str, str], dict], b: int = BOOTSTRAP) -> None:
    """Give every cell `boot` (b resampled scores ×100, or None) and `se`."""
    for task in {t for _, t in table}:
        group = [c for (m, t), c in table.items() if t == task]
        golds = {e.get("dev_gold") if isinstance(e.get("dev_gold"), str) else tuple(e.get("dev_gold") or ())
                 for c in group for e in c["runs"]}
        paired = len(golds) == 1 and all("dev_pred" in e for c in group for e in c["runs"])
        idx = resample_indices(len(decode(group[0]["runs"][0]["dev_gold"])), task, b) if paired else None
        for c in group:
            if paired:
                gold = decode(c["runs"][0]["dev_gold"])
                c["boot"] = 100 * np.mean([metric_resampled(c["metric"], decode(e["dev_pred"]), gold, idx)
                                           for e in c["runs"]], axis=0)
                c["se"] = float(c["boot"].std(ddof=1))
            else:
                c["boot"] = None
                n = c["runs"][0].get("dev_examples")
                p = c["score"] / 100
                c["se"] = 100 * math.sqrt(p * (1 - p) / n) if c["metric"] == "accuracy" and n else None


# ---------------------------------------------------------------------------------------------
# Rows: one method


def _se(values) -> float | None:
    return None if values is None else float(np.std(values, ddof=1))


def summarise(results: dict, costs: dict | None = None) -> dict:
    """Per method: a cell per task, the average (with SE) when every task is in, % of full, and costs.

    `costs` is a separate results file of short side-by-side runs (the costs preset); without it the
    costs are read from the reported runs themselves (quick, medium)."""
    table = cells(results)
    attach_bootstrap(table)
    present = {m for m, _ in table}
    methods = [m for m in METHOD_ORDER if m in present] + sorted(present - set(METHOD_ORDER))
    tasks = [t for t in TASKS if any(k[1] == t for k in table)]
    rows = {}
    for m in methods:
        mine = {t: table[(m, t)] for t in tasks if (m, t) in table}
        complete = len(mine) == len(tasks)
        boots = [c["boot"] for c in mine.values()]
        avg_boot = np.mean(boots, axis=0) if complete and all(x is not None for x in boots) else None
        rows[m] = {
            "cells": mine,
            "scores": {t: c["score"] for t, c in mine.items()},
            "average": _mean([c["score"] for c in mine.values()]) if complete else None,
            "average_boot": avg_boot,
            "average_se": _se(avg_boot),
            "trainable": max(e["trainable"] for c in mine.values() for e in c["runs"]),
            "share": max(e["share"] for c in mine.values() for e in c["runs"]),
        }
    full = rows.get("full")
    for r in rows.values():
        r["pct_full"] = 100 * r["average"] / full["average"] if full and r["average"] is not None and full["average"] else None
        both = full and r["average_boot"] is not None and full["average_boot"] is not None
        r["pct_full_se"] = _se(100 * r["average_boot"] / full["average_boot"]) if both else None
    cost_rows = cost_summary(costs if costs is not None else {"runs": {k: e for c in table.values() for k, e in
                                                                         _keyed(c["runs"])}})
    return {"methods": methods, "tasks": tasks, "rows": rows, "costs": cost_rows, "separate_costs": costs is not None,
            "goals": goals(rows, table, cost_rows)}


def _keyed(runs):
    return [(f"{e['method']}/{e['task']}/{e['lr']:g}/{e.get('seed', 0)}", e) for e in runs]


def cost_summary(costs: dict) -> dict[str, dict]:
    """Per method: step seconds and peak RSS per task (means over a task's runs), and their ratios to full FT
    on the same task, averaged over the tasks both have."""
    per: dict[tuple[str, str], list[dict]] = {}
    for e in costs["runs"].values():
        if _final(e):
            per.setdefault((e["method"], e["task"]), []).append(e)

    def mean_of(m, t, f):
        return _mean([f(e) for e in per.get((m, t), [])])

    out = {}
    for m in [m for m in METHOD_ORDER if any(k[0] == m for k in per)] + sorted({k[0] for k in per} - set(METHOD_ORDER)):
        tasks = [t for t in TASKS if (m, t) in per]
        row = {"tasks": tasks}
        for name, f in (("step_seconds", lambda e: e["step_seconds"]), ("step_cpu_seconds", lambda e: e.get("step_cpu_seconds")),
                        ("peak_rss", lambda e: e["peak_rss"]),
                        ("rss_growth", lambda e: e["peak_rss"] - e["rss_before"] if e.get("rss_before") else None),
                        ("optimizer_bytes", lambda e: e["optimizer_bytes"])):
            row[name] = _mean([mean_of(m, t, f) for t in tasks])
            ratios = [mean_of(m, t, f) / mean_of("full", t, f) for t in tasks
                      if (("full", t) in per) and mean_of(m, t, f) is not None and mean_of("full", t, f)]
            row[name + "_ratio"] = _mean(ratios) if ratios else None
            row[name + "_ratio_range"] = (min(ratios), max(ratios)) if ratios else None
        row["per_task"] = {t: {"step_seconds": mean_of(m, t, lambda e: e["step_seconds"]),
                               "step_cpu_seconds": mean_of(m, t, lambda e: e.get("step_cpu_seconds")),
                               "peak_rss": mean_of(m, t, lambda e: e["peak_rss"]),
                               "steps": mean_of(m, t, lambda e: e["steps"])} for t in tasks}
        out[m] = row
    return out


def paired_difference(table, task: str, a: str, b: str) -> tuple[float | None, float | None]:
    """Score of method a minus method b on one task, and the SE of that difference (paired on dev examples)."""
    ca, cb = table.get((a, task)), table.get((b, task))
    if ca is None or cb is None:
        return None, None
    se = _se(ca["boot"] - cb["boot"]) if ca["boot"] is not None and cb["boot"] is not None else None
    return ca["score"] - cb["score"], se


def goals(rows: dict, table: dict, costs: dict) -> list[dict]:
    """The issue's targets, each with the measured value, its SE where known, and whether it is met (None: pending)."""
    full, bitfit, rand = rows.get("full"), rows.get("bitfit"), rows.get("random")
    out = []
    sst, sst_se = paired_difference(table, "sst2", "bitfit", "full")
    out.append({"goal": "BitFit SST-2 ≥ full FT − 1.5 points", "value": sst, "se": sst_se, "unit": "points",
                "met": None if sst is None else sst >= -1.5})
    avg = bitfit["average"] / full["average"] if full and bitfit and bitfit["average"] is not None and full["average"] else None
    avg_se = (_se(bitfit["average_boot"] / full["average_boot"]) if avg is not None and bitfit["average_boot"] is not None
              and full["average_boot"] is not None else None)
    out.append({"goal": "BitFit average ≥ 98 % of full FT's", "value": avg, "se": avg_se, "unit": "ratio",
                "met": None if avg is None else avg >= 0.98})
    gap = (bitfit["average"] - rand["average"]) if bitfit and rand and bitfit["average"] is not None and rand["average"] is not None else None
    gap_se = (_se(bitfit["average_boot"] - rand["average_boot"]) if gap is not None and bitfit["average_boot"] is not None
              and rand["average_boot"] is not None else None)
    # "clearly": at least a point, and more than two standard errors of the paired difference where one is known
    out.append({"goal": "random subset clearly below BitFit (≥ 1 point on the average, and > 2 SE where known)",
                "value": gap, "se": gap_se, "unit": "points",
                "met": None if gap is None else gap >= 1.0 and (gap_se is None or gap > 2 * gap_se)})
    b = costs.get("bitfit", {})
    # CPU seconds where recorded: a busy machine stretches wall time, unevenly between runs
    step, peak = b.get("step_cpu_seconds_ratio") or b.get("step_seconds_ratio"), b.get("peak_rss_ratio")
    out.append({"goal": "BitFit step time ≤ 0.7× full FT's", "value": step, "se": None, "unit": "ratio",
                "met": None if step is None else step <= 0.7})
    out.append({"goal": "BitFit peak RSS ≤ 0.6× full FT's", "value": peak, "se": None, "unit": "ratio",
                "met": None if peak is None else peak <= 0.6})
    return out
