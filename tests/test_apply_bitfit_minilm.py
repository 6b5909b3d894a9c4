"""apply_bitfit on the real MiniLM with its sequence-classification head: the seed's line, the server's fingerprint,
the Trainer on real SST-2 rows, and the saved set served over real HTTP; and the README's Python quick start, run."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import httpx
import pytest
import torch

import bitfit
from bitfit.data import load_task
from bitfit.inject import base_of
from conftest import REPO, TOLERANCES

pytestmark = pytest.mark.slow
F32 = TOLERANCES[torch.float32]
LABELS = ["negative", "positive"]
TEXTS = ["a gripping, beautifully acted film", "dull and lifeless",
         "the plot made no sense, but the actors tried their best"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine two threads spin against other processes (10x slower here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def classifier(path):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()


@pytest.fixture(scope="module")
def sst2_rows(glue_dir, minilm_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    examples = load_task(glue_dir / "SST-2").train[:16]
    return [dict(tokenizer(e.text, truncation=True, max_length=32), labels=e.label) for e in examples], tokenizer


def mean_loss(model, rows, tokenizer) -> float:
    from transformers import DataCollatorWithPadding

    with torch.no_grad():
        return model.eval()(**DataCollatorWithPadding(tokenizer)(rows)).loss.item()


@pytest.fixture(scope="module")
def trained(minilm_dir, sst2_rows, tmp_path_factory):
    """The MiniLM classifier after apply_bitfit (with what it printed) and 20 Trainer steps on 16 SST-2 rows."""
    import contextlib
    import io

    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    rows, tokenizer = sst2_rows
    model, printed = classifier(minilm_dir), io.StringIO()
    with contextlib.redirect_stdout(printed):
        bitfit.apply_bitfit(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss_before = mean_loss(model, rows, tokenizer)
    args = TrainingArguments(output_dir=str(tmp_path_factory.mktemp("out")), max_steps=20,
                             per_device_train_batch_size=4, learning_rate=5e-3, report_to=[], save_strategy="no",
                             logging_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
    Trainer(model=model, args=args, train_dataset=rows, data_collator=DataCollatorWithPadding(tokenizer)).train()
    model.eval()
    return dict(model=model, printed=printed.getvalue(), before=before, loss_before=loss_before,
                loss_after=mean_loss(model, rows, tokenizer))


def own_prediction(model, tokenizer, texts) -> torch.Tensor:
    enc = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits.softmax(-1)


def test_apply_bitfit_prints_the_seeds_line_and_trains_the_classifier_weight(trained):
    assert trained["printed"] == "Trainable: 26,882 / 22,713,986 (0.118%)\n"
    model = trained["model"]
    assert model.classifier.weight.requires_grad and model.classifier.bias.requires_grad


def test_classifier_backbone_has_the_fingerprint_of_the_servers_backbone(trained):
    from server.testing import minilm

    state = base_of(trained["model"]).bitfit_state
    assert type(base_of(trained["model"])) is type(minilm().model)
    assert state.layout.fingerprint == minilm().layout.fingerprint
    assert state.layout.slots == minilm().layout.slots


def test_trainer_on_sst2_moves_only_biases_and_head_and_lowers_the_loss(trained):
    model, before = trained["model"], trained["before"]
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "classifier.bias"} <= moved <= trainable
    assert all(n.endswith(".bias") for n in moved - {"classifier.weight"})
    assert trained["loss_after"] < 0.9 * trained["loss_before"], (trained["loss_before"], trained["loss_after"])


def test_saved_set_loads_into_a_fresh_classifier_with_the_same_outputs(trained, minilm_dir, sst2_rows, tmp_path):
    tokenizer = sst2_rows[1]
    path = bitfit.save_bias_set(trained["model"], tmp_path / "sst2.safetensors", task="sst2", labels=LABELS)
    fresh = classifier(minilm_dir)
    untrained = own_prediction(fresh, tokenizer, TEXTS)
    bitfit.load_bias_set_into(fresh, path)
    want = own_prediction(trained["model"], tokenizer, TEXTS)
    assert not torch.allclose(untrained, want, **F32)
    torch.testing.assert_close(own_prediction(fresh, tokenizer, TEXTS), want, **F32)


def test_saved_set_uploaded_to_a_running_server_predicts_what_the_model_predicts(trained, sst2_rows, tmp_path):
    from server.http.app import create_app
    from server.settings import Settings
    from server.testing import fresh_engine, serve

    path = bitfit.save_bias_set(trained["model"], tmp_path / "sst2.safetensors", task="mine", labels=LABELS,
                                input_kind="text")
    app = create_app(Settings(store=tmp_path / "store", admin_token="t", seed=False), engine=fresh_engine())
    with serve(app) as url, httpx.Client(base_url=url, timeout=120) as client:
        put = client.put("/tasks/mine", content=path.read_bytes(), headers={"Authorization": "Bearer t"})
        assert put.status_code == 201, put.text
        r = client.post("/predict", params={"task": "mine"}, json={"inputs": TEXTS})
        assert r.status_code == 200, r.text
    served = torch.tensor([[p["scores"][label] for label in LABELS] for p in r.json()["predictions"]])
    torch.testing.assert_close(served, own_prediction(trained["model"], sst2_rows[1], TEXTS).float(), **F32)


def readme_python() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Python\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the README's Python section holds one python block"
    return blocks[0]


def test_readme_python_quick_start_runs_as_written(tmp_path):
    from server.testing import minilm

    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO),
                        "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", readme_python()], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Trainable: 26,882 / 22,713,986 (0.118%)\n" in done.stdout  # the line the README shows
    bias_set = bitfit.load_bias_set(tmp_path / "reviews.safetensors")
    assert (bias_set.task, bias_set.labels, bias_set.pooling) == ("reviews", ["negative", "positive"], "pooler")
    assert bias_set.fingerprint == minilm().layout.fingerprint  # `bitfit serve` takes it
    assert torch.count_nonzero(bias_set.delta) > 0
