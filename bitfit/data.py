"""Reading task data: GLUE task folders (train.tsv / dev.tsv), CSV and JSONL files.

A task is single sentences or sentence pairs, with class labels or (STS-B) a real-valued score.
"""

from __future__ import annotations

import csv
import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

from bitfit.errors import DataError

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


@dataclass(frozen=True)
class Example:
    text: str
    pair: str | None
    label: int | float  # class index, or the score of a regression task


@dataclass(frozen=True)
class Columns:
    """Where a file keeps its text, optional second text and label (names, or indices for header-less TSVs)."""

    text: str | int
    label: str | int
    pair: str | int | None = None
    header: bool = True


@dataclass
class TaskSpec:
    name: str
    labels: list[str]  # class names in output order; [] for regression
    raw_labels: dict[str, int] = field(default_factory=dict)  # label as written in the file -> class index
    metric: str = "accuracy"  # the primary metric on dev

    @property
    def is_regression(self) -> bool:
        return not self.labels


@dataclass
class TaskData:
    spec: TaskSpec
    train: list[Example]
    dev: list[Example]

    @property
    def has_pairs(self) -> bool:
        return any(e.pair is not None for e in self.train[:100])


def _binary(names: tuple[str, str]) -> dict[str, int]:
    return {"0": 0, "1": 1, names[0]: 0, names[1]: 1}


# GLUE folders, keyed by the folder name lower-cased without '-' or '_'.
GLUE: dict[str, tuple[Columns, TaskSpec]] = {
    "sst2": (Columns("sentence", "label"), TaskSpec("sst2", ["negative", "positive"], _binary(("negative", "positive")))),
    "cola": (
        Columns(3, 1, header=False),
        TaskSpec("cola", ["unacceptable", "acceptable"], _binary(("unacceptable", "acceptable")), "matthews"),
    ),
    "mrpc": (
        Columns("#1 String", "Quality", "#2 String"),
        TaskSpec("mrpc", ["not_equivalent", "equivalent"], _binary(("not_equivalent", "equivalent")), "f1"),
    ),
    "rte": (
        Columns("sentence1", "label", "sentence2"),
        TaskSpec("rte", ["entailment", "not_entailment"], {"entailment": 0, "not_entailment": 1}),
    ),
    "qnli": (
        Columns("question", "label", "sentence"),
        TaskSpec("qnli", ["entailment", "not_entailment"], {"entailment": 0, "not_entailment": 1}),
    ),
    "stsb": (Columns("sentence1", "score", "sentence2"), TaskSpec("stsb", [], {}, "pearson")),
}


def glue_key(path: Path) -> str | None:
    key = path.name.lower().replace("-", "").replace("_", "")
    return key if key in GLUE else None


def read_rows(path: Path, columns: Columns) -> list[tuple[str, str | None, str]]:
    """(text, pair, raw label) per row of a TSV, CSV or JSONL file."""
    if not path.is_file():
        raise DataError(f"no data file at {path}")
    if path.suffix == ".jsonl":
        return _read_jsonl(path, columns)
    delimiter = "\t" if path.suffix == ".tsv" else ","
    # GLUE TSVs contain bare '"' characters that are not quotes
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
        rows = [r for r in reader if r]
    if columns.header:
        if not rows:
            raise DataError(f"{path} is empty")
        header, rows = rows[0], rows[1:]
        index = {name.strip(): i for i, name in enumerate(header)}
        want = [c for c in (columns.text, columns.pair, columns.label) if c is not None]
        unknown = [c for c in want if c not in index]
        if unknown:
            raise DataError(f"{path}: column(s) {unknown} not found; the file has columns {list(index)}")
        cols = [index[c] if c is not None else None for c in (columns.text, columns.pair, columns.label)]
    else:
        cols = [columns.text, columns.pair, columns.label]
    out = []
    for n, r in enumerate(rows, start=2 if columns.header else 1):
        needed = max(c for c in cols if c is not None)
        if len(r) <= needed:
            raise DataError(f"{path}:{n}: row has {len(r)} fields, expected at least {needed + 1}")
        t, p, y = (r[c] if c is not None else None for c in cols)
        out.append((t.strip(), p.strip() if p is not None else None, y.strip()))
    if not out:
        raise DataError(f"{path} has no data rows")
    return out


def _read_jsonl(path: Path, columns: Columns) -> list[tuple[str, str | None, str]]:
    out = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e})") from None
            missing = [c for c in (columns.text, columns.pair, columns.label) if c is not None and c not in obj]
            if missing:
                raise DataError(f"{path}:{n}: key(s) {missing} not found; the object has keys {list(obj)}")
            pair = str(obj[columns.pair]) if columns.pair is not None else None
            out.append((str(obj[columns.text]), pair, str(obj[columns.label])))
    if not out:
        raise DataError(f"{path} has no data rows")
    return out


def to_examples(rows, spec: TaskSpec, path: Path) -> list[Example]:
    out = []
    for n, (text, pair, raw) in enumerate(rows, start=1):
        if spec.is_regression:
            try:
                label: int | float = float(raw)
            except ValueError:
                raise DataError(f"{path}: row {n}: label {raw!r} is not a number (regression task)") from None
        else:
            if raw not in spec.raw_labels:
                raise DataError(f"{path}: row {n}: label {raw!r} is not one of the declared labels {spec.labels}")
            label = spec.raw_labels[raw]
        out.append(Example(text, pair, label))
    return out


def load_task(
    path: str | Path,
    *,
    task: str | None = None,
    text_column: str | None = None,
    pair_column: str | None = None,
    label_column: str | None = None,
    labels: list[str] | None = None,
    regression: bool = False,
    dev_path: str | Path | None = None,
    dev_fraction: float = 0.1,
    seed: int = 0,
) -> TaskData:
    """Read a GLUE folder, or a CSV/JSONL file (with a held-out dev split unless `dev_path` is given)."""
    path = Path(path)
    if path.is_dir():
        key = glue_key(path)
        if key is None:
            raise DataError(f"{path} is a folder but not a known GLUE task ({', '.join(GLUE)}); pass a CSV or JSONL file")
        columns, spec = GLUE[key]
        spec = TaskSpec(task or spec.name, spec.labels, spec.raw_labels, spec.metric)
        train = to_examples(read_rows(path / "train.tsv", columns), spec, path / "train.tsv")
        dev = to_examples(read_rows(path / "dev.tsv", columns), spec, path / "dev.tsv")
        return TaskData(spec, train, dev)

    if path.suffix not in (".csv", ".jsonl", ".tsv"):
        raise DataError(f"{path}: expected a GLUE task folder, a .csv, .tsv or .jsonl file")
    columns = Columns(text_column or "text", label_column or "label", pair_column)
    rows = read_rows(path, columns)
    dev_rows = read_rows(Path(dev_path), columns) if dev_path else None
    if regression:
        spec = TaskSpec(task or path.stem, [], {}, "pearson")
    else:
        declared = labels or sorted({y for _, _, y in rows})
        if len(declared) < 2:
            raise DataError(f"{path}: a classification task needs at least two labels, found {declared}")
        spec = TaskSpec(task or path.stem, list(declared), {y: i for i, y in enumerate(declared)})
    examples = to_examples(rows, spec, path)
    if dev_rows is not None:
        return TaskData(spec, examples, to_examples(dev_rows, spec, Path(dev_path)))
    rng = random.Random(seed)
    order = list(range(len(examples)))
    rng.shuffle(order)
    n_dev = max(1, int(len(examples) * dev_fraction))
    if len(examples) - n_dev < 1:
        raise DataError(f"{path}: {len(examples)} row(s) are too few to hold out a dev split; pass --dev")
    dev = [examples[i] for i in sorted(order[:n_dev])]
    train = [examples[i] for i in sorted(order[n_dev:])]
    return TaskData(spec, train, dev)


def subset(examples: list[Example], n: int | None, seed: int) -> list[Example]:
    """A fixed random subset of n examples (all of them when n is None or larger)."""
    if n is None or n >= len(examples):
        return list(examples)
    rng = random.Random(seed)
    return rng.sample(examples, n)
