"""The real SmolLM2 engine with four generation tasks, shared by the generation tests (loaded once per process).

The tasks are the shipped E2E set and three variants of it with their deltas perturbed, so that greedy outputs
differ between tasks (the tests assert they do before comparing mixed with alone)."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

SHIPPED = Path(__file__).resolve().parents[1] / "server" / "seed" / "smollm2" / "e2e.safetensors"
TASKS = ("e2e", "e2e-b", "e2e-c", "e2e-d")
MRS = [  # E2E meaning representations, in the data's own format
    "name : The Eagle | Type : coffee shop | food : French | price : moderate | area : riverside",
    "name : Blue Spice | Type : pub | food : Chinese | area : city centre | family friendly : yes",
    "name : The Mill | Type : restaurant | food : Italian | price : cheap | near : Cafe Sicilia",
    "name : Zizzi | Type : pub | customer rating : 5 out of 5 | family friendly : no",
]


def variant(task: str, seed: int, scale: float = 2.0) -> bytes:
    """The shipped set under another task name, its deltas moved by `scale` times their own spread (seed 0: as is)."""
    from bitfit.bias_set import BiasSet

    bias_set = BiasSet.from_bytes(SHIPPED.read_bytes())
    bias_set.task = task
    if seed:
        g = torch.Generator().manual_seed(seed)
        bias_set.delta = bias_set.delta + torch.randn(bias_set.delta.shape, generator=g) * bias_set.delta.std() * scale
    return bias_set.to_bytes()


def skip_without_smollm2() -> None:
    from test_llm_real import missing_package

    reason = missing_package()
    if reason:
        pytest.skip(reason)


@functools.lru_cache(maxsize=1)
def engine():
    """A TorchEngine on SmolLM2 (float32, CPU) with the four tasks resident as (task, "v0")."""
    from bitfit.backbone import load_backbone
    from bitfit.bias_set import BiasSet
    from server.runtime.engine import TorchEngine

    e = TorchEngine(load_backbone("smollm2"))
    for i, task in enumerate(TASKS):
        e.bank.load((task, "v0"), BiasSet.from_bytes(variant(task, i)))
    return e


def prompt_ids(task: str, mr: str) -> list[int]:
    """The token ids of `mr` posed through the task's template, as the server builds them."""
    e = engine()
    info = e.bank.info[e.bank.row((task, "v0"))]
    return e.tokenizer(info.prompt_template.replace("{input}", mr), add_special_tokens=False)["input_ids"]


@functools.lru_cache(maxsize=None)
def reference(task: str, mr: str, max_tokens: int) -> tuple[int, ...]:
    """Greedy tokens of `mr` for `task` alone, by `bitfit.generate.greedy` on the engine with the task swapped into
    its flat buffer (the plain forward: no banked row read, no scheduler), stopping at eos or max_tokens only."""
    from bitfit.generate import StopCheck, greedy
    from bitfit.lm import eos_ids, language_model

    e = engine()
    e._swap_in(e.bank.row((task, "v0")))
    check = StopCheck(eos_ids(e.tokenizer))
    out = greedy(language_model(e.backbone), [prompt_ids(task, mr)], max_new_tokens=max_tokens, check=check,
                 pad_id=e.tokenizer.pad_token_id)
    e.reset()
    return tuple(out[0])
