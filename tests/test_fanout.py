"""POST /fanout: the same inputs to many tasks, in one gather forward, through a real uvicorn server on MiniLM."""

from __future__ import annotations

import httpx
import pytest
import torch

from server.http.app import create_app
from server.settings import Settings
from server.testing import fresh_engine, minilm, random_bias_set, serve

TOKEN = "fanout-admin"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
TEXTS = ["an utterly charming film", "boring", "the plot made no sense, but the actors tried their best"]
TASKS = ["moderation", "topic", "tone", "spam"]
LABELS = {"moderation": ["ok", "flag"], "topic": ["sport", "film", "news"], "tone": ["neg", "pos"], "spam": ["ham", "spam"]}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    settings = Settings(store=tmp_path_factory.mktemp("store"), admin_token=TOKEN, max_batch=32, max_wait_ms=20,
                        max_inputs=16, poll_interval_s=0.1)
    app = create_app(settings, fresh_engine())
    with serve(app) as url, httpx.Client(base_url=url, timeout=120) as client:
        client.app = app
        backbone = minilm()
        for i, task in enumerate(TASKS):
            bias_set = random_bias_set(backbone, task, LABELS[task], seed=100 + i, input_kind="text",
                                       pooling=("mean", "cls", "pooler", "mean")[i])
            assert client.put(f"/tasks/{task}", content=bias_set.to_bytes(), headers=ADMIN).status_code == 201
        pair = random_bias_set(backbone, "paired", ["a", "b"], seed=120, input_kind="pair")
        assert client.put("/tasks/paired", content=pair.to_bytes(), headers=ADMIN).status_code == 201
        yield client


def batches(api) -> dict[str, float]:
    metrics = api.app.state.metrics
    return {m: metrics.batches.labels(m)._value.get() for m in ("swap", "gather", "group")}


def scores(body) -> torch.Tensor:
    return torch.tensor([list(p["scores"].values()) for p in body["predictions"]])


def test_four_tasks_run_in_one_gather_forward_equal_to_each_task_alone(api):
    alone = {}
    for task in TASKS:
        r = api.post("/predict", params={"task": task}, json={"inputs": TEXTS})
        assert r.status_code == 200
        alone[task] = r.json()
    before, size = batches(api), api.app.state.metrics.batch_size.labels("gather")._sum.get()
    r = api.post("/fanout", params=[("task", t) for t in TASKS], json={"inputs": TEXTS})
    assert r.status_code == 200, r.text
    after = batches(api)
    assert {m: after[m] - before[m] for m in after} == {"swap": 0, "gather": 1, "group": 0}  # ONE forward
    assert api.app.state.metrics.batch_size.labels("gather")._sum.get() - size == len(TASKS) * len(TEXTS)
    results = r.json()["results"]
    assert [x["task"] for x in results] == TASKS  # in the order asked
    for result in results:
        want = alone[result["task"]]
        assert result["version"] == want["version"]
        assert [p["label"] for p in result["predictions"]] == [p["label"] for p in want["predictions"]]
        assert list(result["predictions"][0]["scores"]) == LABELS[result["task"]]
        torch.testing.assert_close(scores(result), scores(want), atol=1e-5, rtol=1e-4)
    # the tasks really differ, so equal answers are not an accident of one head answering for all
    assert not torch.allclose(scores(results[0]), scores(results[2]), atol=1e-3)


def test_the_same_task_twice_is_answered_twice(api):
    r = api.post("/fanout", params=[("task", "tone"), ("task", "tone")], json={"inputs": TEXTS[:1]})
    assert r.status_code == 200 and [x["task"] for x in r.json()["results"]] == ["tone", "tone"]
    assert r.json()["results"][0] == r.json()["results"][1]


@pytest.mark.parametrize(("tasks", "inputs", "status", "needle"), [
    (TASKS * 3, TEXTS, 422, "12 tasks x 3 inputs = 36 rows, over the batch limit of 32 (BITFIT_MAX_BATCH)"),
    (["tone", "nope", "gone"], TEXTS, 404, "tasks 'nope', 'gone' are not in the store"),
    (["tone", "paired"], TEXTS, 422, "these tasks take different inputs"),
    (["paired"], TEXTS, 422, 'takes text pairs: {"inputs": [["text a", "text b"], ...]}'),
    ([], TEXTS, 422, "task"),
    (["Bad.Name"], TEXTS, 422, "upper-case"),
    (["tone"], [], 422, "inputs"),
    (["tone"], ["x"] * 17, 422, "BITFIT_MAX_INPUTS"),
], ids=["tasks x inputs over the batch limit", "unknown tasks", "tasks of different input kinds",
        "inputs of the wrong kind", "no task", "bad task name", "no inputs", "too many inputs"])
def test_fanout_refusals_say_what_to_fix_and_run_nothing(api, tasks, inputs, status, needle):
    before = batches(api)
    r = api.post("/fanout", params=[("task", t) for t in tasks], json={"inputs": inputs})
    assert r.status_code == status, r.text
    assert needle in r.json()["detail"], r.text
    assert batches(api) == before
