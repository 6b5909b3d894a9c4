"""E2E NLG data (restaurant meaning representation → sentence) in the LoRA repository's one-line format.

Each line is `field : value | field : value ...||reference sentence`: one meaning representation (MR) and
one human reference. An MR has several references, one line each, so training reads lines as
(MR, reference) pairs while scoring groups the references of each MR (BLEU against all of them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bitfit.errors import DataError

SEPARATOR = "||"
SPLITS = {"train": "train.txt", "dev": "valid.txt", "test": "test.txt"}


@dataclass(frozen=True)
class Pair:
    source: str  # the meaning representation, e.g. "name : The Vaults | Type : pub"
    target: str  # one reference sentence


@dataclass(frozen=True)
class Grouped:
    source: str
    references: tuple[str, ...]  # every reference of this MR, in file order


@dataclass
class GenerationData:
    """A generation task: training and dev pairs, and the test split (pairs; `grouped` for scoring)."""

    name: str
    train: list[Pair]
    dev: list[Pair]
    test: list[Pair] = field(default_factory=list)
    source: str = ""  # the folder or file it was read from


def parse_line(line: str, where: str = "") -> Pair:
    """One `MR||reference` line; the reference's trailing space (there in every line of the files) is dropped."""
    if SEPARATOR not in line:
        raise DataError(f"{where}: no '{SEPARATOR}' between meaning representation and reference; "
                        "E2E lines read 'field : value | ...||sentence'")
    source, target = line.split(SEPARATOR, 1)
    source, target = source.strip(), target.strip()
    if not source or not target:
        raise DataError(f"{where}: empty {'meaning representation' if not source else 'reference'}")
    return Pair(source, target)


def read_pairs(path: str | Path) -> list[Pair]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no E2E file at {path}")
    pairs = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                pairs.append(parse_line(line.rstrip("\n"), f"{path}:{n}"))
    if not pairs:
        raise DataError(f"{path} holds no lines")
    return pairs


def group_references(pairs: list[Pair]) -> list[Grouped]:
    """One entry per distinct MR, in order of first appearance, with all its references."""
    refs: dict[str, list[str]] = {}
    for p in pairs:
        refs.setdefault(p.source, []).append(p.target)
    return [Grouped(s, tuple(r)) for s, r in refs.items()]


def load_generation_data(path: str | Path, task: str | None = None) -> GenerationData:
    """An E2E folder (train.txt, valid.txt, test.txt as in ../shared/data/e2e); test is optional."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path} is not a folder; a generation task folder holds "
                        f"{', '.join(SPLITS.values())} in the E2E one-line format")
    missing = [name for split, name in SPLITS.items() if split != "test" and not (path / name).is_file()]
    if missing:
        raise DataError(f"{path} lacks {', '.join(missing)}; a generation task folder holds "
                        f"{', '.join(SPLITS.values())} (test optional)")
    test = path / SPLITS["test"]
    return GenerationData(
        name=task or path.name,
        train=read_pairs(path / SPLITS["train"]),
        dev=read_pairs(path / SPLITS["dev"]),
        test=read_pairs(test) if test.is_file() else [],
        source=str(path),
    )
