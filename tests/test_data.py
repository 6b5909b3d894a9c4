"""Reading GLUE folders, CSV and JSONL, and the errors a user sees for bad data."""

import json

import pytest

from bitfit.data import load_task
from bitfit.errors import DataError
from conftest import write_rows

GLUE_TASKS = [  # folder, train rows, dev rows, labels, pairs
    ("SST-2", 67_349, 872, ["negative", "positive"], False),
    ("CoLA", 8_551, 1_043, ["unacceptable", "acceptable"], False),
    ("MRPC", 3_668, 408, ["not_equivalent", "equivalent"], True),
    ("RTE", 2_490, 277, ["entailment", "not_entailment"], True),
    ("STS-B", 5_749, 1_500, [], True),
]


@pytest.mark.parametrize("folder,n_train,n_dev,labels,pairs", GLUE_TASKS, ids=[t[0] for t in GLUE_TASKS])
def test_glue_folders_read_whole(glue_dir, folder, n_train, n_dev, labels, pairs):
    data = load_task(glue_dir / folder)
    assert (len(data.train), len(data.dev)) == (n_train, n_dev)
    assert data.spec.labels == labels
    assert data.has_pairs == pairs
    assert all(e.text for e in data.train[:50])


def test_glue_label_counts_match_the_data_readme(glue_dir):
    sst2 = load_task(glue_dir / "SST-2")
    assert sum(e.label for e in sst2.dev) == 444  # positives
    stsb = load_task(glue_dir / "STS-B")
    assert all(0.0 <= e.label <= 5.0 for e in stsb.train)


def test_csv_with_named_columns_and_held_out_dev(tmp_path):
    rows = [[f"text {i}", "pos" if i % 2 else "neg"] for i in range(40)]
    path = write_rows(tmp_path / "reviews.csv", ["review", "stars"], rows, sep=",")
    data = load_task(path, text_column="review", label_column="stars")
    assert data.spec.labels == ["neg", "pos"]
    assert len(data.train) + len(data.dev) == 40 and len(data.dev) == 4
    again = load_task(path, text_column="review", label_column="stars")
    assert [e.text for e in again.dev] == [e.text for e in data.dev]  # seeded split


def test_jsonl_pairs_and_regression(tmp_path):
    path = tmp_path / "sim.jsonl"
    path.write_text("\n".join(json.dumps({"a": f"x{i}", "b": f"y{i}", "s": i / 10}) for i in range(20)))
    data = load_task(path, text_column="a", pair_column="b", label_column="s", regression=True)
    assert data.spec.is_regression and data.has_pairs
    assert {type(e.label) for e in data.train} == {float}


ERROR_CASES = [  # name, file name, content, kwargs, message
    ("missing column", "a.csv", "text,label\nhi,pos\n", dict(text_column="review"), r"column\(s\) \['review'\] not found; the file has columns \['text', 'label'\]"),
    ("label not declared", "a.csv", "text,label\nhi,pos\nyo,meh\n", dict(labels=["pos", "neg"]), r"label 'meh' is not one of the declared labels \['pos', 'neg'\]"),
    ("empty file", "a.csv", "", {}, r"is empty"),
    ("header only", "a.csv", "text,label\n", {}, r"has no data rows"),
    ("jsonl missing key", "a.jsonl", '{"text": "hi"}\n', {}, r"key\(s\) \['label'\] not found"),
    ("jsonl broken", "a.jsonl", '{"text": \n', {}, r"not valid JSON"),
    ("regression not a number", "a.csv", "text,label\nhi,high\nyo,1\n", dict(regression=True), r"label 'high' is not a number"),
    ("one label only", "a.csv", "text,label\nhi,pos\nyo,pos\n", {}, r"at least two labels"),
    ("unknown suffix", "a.parquet", "x", {}, r"expected a GLUE task folder"),
]


@pytest.mark.parametrize("name,fname,content,kwargs,message", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_bad_data_is_refused_with_a_clear_message(tmp_path, name, fname, content, kwargs, message):
    path = tmp_path / fname
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_task(path, **kwargs)


def test_unknown_folder_names_the_glue_tasks(tmp_path):
    with pytest.raises(DataError, match="not a known GLUE task"):
        load_task(tmp_path)
