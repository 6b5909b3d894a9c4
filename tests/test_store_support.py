"""Helpers shared by the store tests: a tiny backbone layout, valid bias sets, raw safetensors, snapshots.

Importable by name from the test modules and from spawned child processes (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save as st_save_numpy

from bitfit.bias_set import BiasSet
from bitfit.layout import BiasLayout, layout_of
from bitfit.spec import ServingSpec

HIDDEN = 32  # tiny_config("bert").hidden_size


@functools.lru_cache(maxsize=4)
def tiny_layout(seed: int = 0) -> BiasLayout:
    """The layout of a tiny BERT; another seed gives the same shapes with another fingerprint."""
    from conftest import tiny_model

    return layout_of(tiny_model("bert", seed=seed))


def tiny_spec(seed: int = 0) -> ServingSpec:
    """The serving spec of the tiny BERT (it has a pooler)."""
    return ServingSpec.for_layout(tiny_layout(seed), HIDDEN, has_pooler=True)


def make_bias_set(
    layout: BiasLayout, task: str = "sst2", labels=("neg", "pos"), seed: int = 0, **fields
) -> BiasSet:
    g = torch.Generator().manual_seed(seed)
    n = len(labels) or 1
    return BiasSet(
        task=task,
        delta=torch.randn(layout.size, generator=g) * 0.01,
        head={"out.weight": torch.randn(n, HIDDEN, generator=g), "out.bias": torch.randn(n, generator=g)},
        labels=list(labels),
        fingerprint=layout.fingerprint,
        metrics=fields.pop("metrics", {"accuracy": 0.5 + seed / 1000}),
        created_at=fields.pop("created_at", "2026-01-01T00:00:00+00:00"),  # same seed, same bytes
        **fields,
    )


def valid_bytes(layout: BiasLayout, task: str = "sst2", seed: int = 0, **kw) -> bytes:
    return make_bias_set(layout, task, seed=seed, **kw).to_bytes()


def parts(layout: BiasLayout, task: str = "sst2", seed: int = 0, **kw) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """A valid bias set as (numpy tensors, metadata), to be broken and re-saved with `raw`."""
    bs = make_bias_set(layout, task, seed=seed, **kw)
    return {k: v.numpy().copy() for k, v in bs.tensors().items()}, bs.metadata()


def raw(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None) -> bytes:
    return st_save_numpy(tensors, metadata=metadata)


def with_header(header: dict | bytes, data: bytes = b"") -> bytes:
    """A hand-made safetensors file: 8-byte little-endian length, header, data."""
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return len(h).to_bytes(8, "little") + h + data


def snapshot(root: Path) -> dict[str, bytes]:
    """Every entry under root: file path -> bytes, directory path -> b"<dir>"."""
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(root.rglob("*"))}
