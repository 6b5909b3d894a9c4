"""E2E NLG data: the one-line format, references grouped per meaning representation, the real files' counts."""

from __future__ import annotations

from pathlib import Path

import pytest

from bitfit.e2e import Grouped, Pair, group_references, load_generation_data, parse_line, read_pairs
from bitfit.errors import DataError

E2E_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "e2e"


@pytest.fixture(scope="module")
def e2e_dir() -> Path:
    if not (E2E_DIR / "train.txt").is_file():
        pytest.skip(f"E2E data not found at {E2E_DIR}")
    return E2E_DIR


def test_line_splits_at_the_double_bar_and_drops_the_trailing_space():
    pair = parse_line("name : The Vaults | Type : pub||The Vaults is a pub . ")
    assert pair == Pair("name : The Vaults | Type : pub", "The Vaults is a pub .")


def test_a_double_bar_inside_the_reference_stays_in_it():
    assert parse_line("name : A||It is || odd").target == "It is || odd"


@pytest.mark.parametrize(
    "line, message",
    [("name : A | Type : pub", "no '||'"), ("||A sentence .", "empty meaning representation"), ("name : A||  ", "empty reference")],
    ids=["no-separator", "no-mr", "no-reference"],
)
def test_malformed_line_is_refused_with_its_place(tmp_path, line, message):
    path = tmp_path / "train.txt"
    path.write_text("name : B||Fine .\n" + line + "\n")
    with pytest.raises(DataError, match=message) as e:
        read_pairs(path)
    assert f"{path}:2" in str(e.value)


def test_references_are_grouped_per_input_in_first_seen_order():
    pairs = [Pair("a", "1"), Pair("b", "2"), Pair("a", "3"), Pair("c", "4"), Pair("b", "5")]
    assert group_references(pairs) == [Grouped("a", ("1", "3")), Grouped("b", ("2", "5")), Grouped("c", ("4",))]


def test_folder_without_train_or_valid_is_refused(tmp_path):
    (tmp_path / "train.txt").write_text("a||b\n")
    with pytest.raises(DataError, match="lacks valid.txt"):
        load_generation_data(tmp_path)
    with pytest.raises(DataError, match="is not a folder"):
        load_generation_data(tmp_path / "train.txt")


def test_real_files_hold_the_counts_their_readme_gives(e2e_dir):
    data = load_generation_data(e2e_dir, "e2e")
    counts = {split: (len(pairs), len(group_references(pairs)))
              for split, pairs in (("train", data.train), ("dev", data.dev), ("test", data.test))}
    assert counts == {"train": (42_061, 4_862), "dev": (4_672, 547), "test": (4_693, 630)}
    assert data.name == "e2e"
