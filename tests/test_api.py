"""The HTTP API, through a real uvicorn server on a loopback port, on the real MiniLM.

Two servers share one store, as two processes would: `api` (admin token set, seeded with the shipped bias
sets) and `peer` (no token). Random tasks of every kind are uploaded through the API itself.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from bitfit.bias_set import load_bias_set
from bitfit.spec import ServingSpec
from server.http.app import create_app
from server.settings import Settings
from server.testing import alone, fresh_engine, minilm, random_bias_set, serve

from conftest import TOLERANCES

TOKEN = "test-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
F32 = TOLERANCES[torch.float32]
SEED_DIR = Path(os.environ.get("BITFIT_SEED_DIR") or Path(__file__).resolve().parents[1] / "server" / "seed")
SHIPPED = sorted(p.stem for p in SEED_DIR.glob("*.safetensors"))
PAIR_TASKS = {"mrpc", "stsb", "rte", "qnli", "pair"}
TEXTS = ["an utterly charming film", "boring", "the plot made no sense, but the actors tried their best"]
PAIRS = [("A man plays a guitar.", "Someone makes music."), ("Cats sleep.", "The market fell.")]
LIMITS = dict(max_inputs=64, max_text_chars=2000, max_body_bytes=64 << 10, max_upload_bytes=256 << 10,
              max_queued=128, max_wait_ms=20, poll_interval_s=0.1)


def inputs_for(task: str):
    return PAIRS if task in PAIR_TASKS else TEXTS


@pytest.fixture(scope="module")
def backbone():
    return minilm()


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="module")
def api(store_dir):
    app = create_app(Settings(store=store_dir, admin_token=TOKEN, **LIMITS), fresh_engine())
    with serve(app) as url, httpx.Client(base_url=url, timeout=120) as client:
        client.app = app
        yield client


@pytest.fixture(scope="module")
def peer(api, store_dir):
    app = create_app(Settings(store=store_dir, seed=False, **LIMITS), fresh_engine())
    with serve(app) as url, httpx.Client(base_url=url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def random_sets(backbone):
    return {
        "single": random_bias_set(backbone, "single", ["neg", "pos"], seed=11),
        "pair": random_bias_set(backbone, "pair", ["yes", "no", "maybe"], pooling="pooler", seed=12),
        "score": random_bias_set(backbone, "score", [], pooling="cls", seed=13),
    }


@pytest.fixture(scope="module")
def uploaded(api, random_sets):
    versions = {}
    for name, bias_set in random_sets.items():
        r = api.put(f"/tasks/{name}", content=bias_set.to_bytes(), headers=ADMIN)
        assert r.status_code == 201, r.text
        versions[name] = r.json()["version"]
    return versions


def predict(client, task, inputs, **params):
    r = client.post("/predict", params={"task": task, **params}, json={"inputs": inputs})
    assert r.status_code == 200, r.text
    return r.json()


def outputs_of(body, labels) -> torch.Tensor:
    """The logits behind a response, up to the softmax's shift: log-probabilities, or values."""
    if not labels:
        return torch.tensor([[p["value"]] for p in body["predictions"]])
    return torch.tensor([[p["scores"][lab] for lab in labels] for p in body["predictions"]]).log()


def expected(backbone, bias_set, inputs) -> torch.Tensor:
    out = torch.stack(alone(backbone, bias_set, inputs))
    return out if not bias_set.labels else out.log_softmax(-1)


# -- health and docs ---------------------------------------------------------------------------------------


def test_health_readiness_docs_and_openapi(api, uploaded):
    assert api.get("/healthz").json() == {"status": "ok"}
    ready = api.get("/readyz").json()
    assert ready["status"] == "ready" and ready["resident"] >= 3 and ready["bank_bytes"] > 0
    assert api.get("/docs").status_code == 200
    paths = api.get("/openapi.json").json()["paths"]
    for path in ("/predict", "/tasks", "/tasks/{task}", "/tasks/{task}/activate", "/tasks/{task}/rollback",
                 "/tasks/{task}/versions/{version}", "/healthz", "/readyz", "/metrics"):
        assert path in paths, path


# -- predict -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["single", "pair", "score"], ids=str)
def test_predict_answers_as_the_task_alone_and_names_its_version(api, uploaded, random_sets, backbone, task):
    from server.http.schemas import ClassPrediction, PredictResponse, RegressionPrediction

    bias_set = random_sets[task]
    body = predict(api, task, inputs_for(task))
    assert body["task"] == task and body["version"] == uploaded[task]
    # the answer is exactly the documented contract: it round-trips through the response model unchanged
    kind = ClassPrediction if bias_set.labels else RegressionPrediction
    assert PredictResponse.model_validate(body).model_dump() == body
    assert all(set(p) == set(kind.model_fields) for p in body["predictions"])
    torch.testing.assert_close(outputs_of(body, bias_set.labels), expected(backbone, bias_set, inputs_for(task)),
                               atol=1e-4, rtol=1e-4)
    if bias_set.labels:
        p = body["predictions"][0]
        assert p["label"] in bias_set.labels and p["score"] == max(p["scores"].values())
        assert abs(sum(p["scores"].values()) - 1) < 1e-5


def test_shipped_tasks_were_seeded():
    assert {"sst2", "mrpc", "stsb"} <= set(SHIPPED), f"server/seed/ holds {SHIPPED}"


@pytest.mark.parametrize("task", SHIPPED, ids=str)
def test_predict_each_shipped_task(api, backbone, task):
    bias_set = load_bias_set(SEED_DIR / f"{task}.safetensors")
    info = api.get(f"/tasks/{task}").json()
    body = predict(api, task, inputs_for(task))
    assert body["version"] == info["active"]
    torch.testing.assert_close(outputs_of(body, bias_set.labels), expected(backbone, bias_set, inputs_for(task)),
                               atol=1e-4, rtol=1e-4)


def test_sst2_dev_accuracy_over_http_equals_bitfit_evaluate(api, backbone, glue_dir):
    """The same fixed dev subset both ways (BITFIT_TEST_DEV_EXAMPLES=872 for the whole set, ~80 s on 2 busy cores)."""
    if "sst2" not in SHIPPED:
        pytest.skip("no shipped sst2 bias set yet (test_shipped_tasks_were_seeded fails meanwhile)")
    from bitfit.data import load_task, subset
    from bitfit.evaluate import evaluate, task_model_from_bias_set

    bias_set = load_bias_set(SEED_DIR / "sst2.safetensors")
    data = load_task(glue_dir / "SST-2", task="sst2")
    dev = subset(data.dev, int(os.environ.get("BITFIT_TEST_DEV_EXAMPLES", 256)), 0)
    try:
        want = evaluate(task_model_from_bias_set(backbone, bias_set), backbone, data.spec, dev)["accuracy"]
    finally:
        backbone.reset_biases()
    chunks = [dev[i : i + 64] for i in range(0, len(dev), 64)]
    with ThreadPoolExecutor(2) as pool:  # two requests of 64 in flight: within max_queued (128)
        bodies = list(pool.map(lambda c: predict(api, "sst2", [e.text for e in c]), chunks))
    labels = [p["label"] for b in bodies for p in b["predictions"]]
    correct = sum(bias_set.labels.index(lab) == e.label for lab, e in zip(labels, dev))
    assert len(labels) == len(dev)
    # evaluate's accuracy is a float32 mean: compare counts of correct answers
    assert correct == round(want * len(dev)), f"HTTP {correct}/{len(dev)} correct, bitfit.evaluate {want:.4f}"


def test_concurrent_requests_for_three_tasks_all_match_single_task_answers(api, uploaded, random_sets, backbone):
    want = {t: expected(backbone, random_sets[t], inputs_for(t)) for t in random_sets}
    jobs = [t for _ in range(6) for t in random_sets]
    with ThreadPoolExecutor(len(jobs)) as pool:
        bodies = list(pool.map(lambda t: predict(api, t, inputs_for(t)), jobs))
    for task, body in zip(jobs, bodies):
        assert body["version"] == uploaded[task]
        torch.testing.assert_close(outputs_of(body, random_sets[task].labels), want[task], atol=1e-4, rtol=1e-4)
    metrics = api.get("/metrics").text
    assert 'bitfit_batches_total{mode="gather"}' in metrics


def test_long_input_is_truncated_and_flagged(api, uploaded):
    body = predict(api, "single", ["fine", "word " * 300])
    assert [p["truncated"] for p in body["predictions"]] == [False, True]


# -- versions: upload, activate, rollback, ?version= ---------------------------------------------------------


def test_upload_goes_live_at_once_and_rollback_brings_the_old_answers_back(api, uploaded, backbone):
    v1_set = random_bias_set(backbone, "live", seed=21)
    v2_set = random_bias_set(backbone, "live", seed=22)
    v1 = api.put("/tasks/live", content=v1_set.to_bytes(), headers=ADMIN).json()["version"]
    old = predict(api, "live", TEXTS)
    assert old["version"] == v1
    v2 = api.put("/tasks/live", content=v2_set.to_bytes(), headers=ADMIN).json()["version"]
    new = predict(api, "live", TEXTS)  # no restart, no wait
    assert new["version"] == v2 != v1
    torch.testing.assert_close(outputs_of(new, v2_set.labels), expected(backbone, v2_set, TEXTS), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(outputs_of(new, v2_set.labels), outputs_of(old, v1_set.labels), atol=1e-3)
    r = api.post("/tasks/live/rollback", headers=ADMIN)
    assert r.status_code == 200 and r.json() == {"task": "live", "version": v1}
    back = predict(api, "live", TEXTS)
    assert back["version"] == v1
    torch.testing.assert_close(outputs_of(back, v1_set.labels), outputs_of(old, v1_set.labels), atol=1e-5, rtol=1e-5)
    # the other version stays reachable by name, and activate makes it answer again
    assert predict(api, "live", TEXTS, version=v2)["version"] == v2
    assert api.post("/tasks/live/activate", json={"version": v2}, headers=ADMIN).json()["version"] == v2
    assert predict(api, "live", TEXTS)["version"] == v2


def test_upload_without_activation_leaves_the_active_version(api, uploaded, backbone):
    r = api.put("/tasks/single", params={"activate": "false"}, headers=ADMIN,
                content=random_bias_set(backbone, "single", ["neg", "pos"], seed=31).to_bytes())
    assert r.status_code == 201
    assert predict(api, "single", TEXTS)["version"] == uploaded["single"]
    assert predict(api, "single", TEXTS, version=r.json()["version"])["version"] == r.json()["version"]
    versions = {v["version"]: v for v in api.get("/tasks/single").json()["versions"]}
    assert versions[uploaded["single"]]["active"] and not versions[r.json()["version"]]["active"]


def test_upload_the_bank_refuses_is_422_removed_from_the_store_and_the_old_version_answers(api, uploaded, backbone,
                                                                                          monkeypatch):
    # the store and the bank run one check (the serving spec), so this takes a fault injected into the bank
    runner = api.app.state.service.runner
    before_tasks = api.get("/tasks/single").json()
    old = predict(api, "single", TEXTS)

    async def refuse(key, bias_set):
        raise RuntimeError("device out of memory (injected)")

    monkeypatch.setattr(runner, "load", refuse)
    r = api.put("/tasks/single", content=random_bias_set(backbone, "single", ["neg", "pos"], seed=35).to_bytes(),
                headers=ADMIN)
    assert r.status_code == 422 and "could not be loaded, so it was removed" in r.json()["detail"]
    assert "device out of memory (injected)" in r.json()["detail"]
    monkeypatch.undo()
    assert api.get("/tasks/single").json() == before_tasks
    assert predict(api, "single", TEXTS) == old


@pytest.mark.parametrize(("kind", "sent", "needle"), [
    ("text", [["A man plays.", "Someone plays."]], 'takes single texts: {"inputs": ["text", ...]}'),
    ("pair", ["just one text"], 'takes text pairs: {"inputs": [["text a", "text b"], ...]}'),
], ids=["pair sent to a single-text task", "single text sent to a pair task"])
def test_the_wrong_input_kind_is_refused_naming_the_expected_form(api, backbone, kind, sent, needle):
    task = f"kind-{kind}"
    bias_set = random_bias_set(backbone, task, seed=51, input_kind=kind)
    assert api.put(f"/tasks/{task}", content=bias_set.to_bytes(), headers=ADMIN).status_code == 201
    r = api.post("/predict", params={"task": task}, json={"inputs": sent})
    assert r.status_code == 422 and needle in r.json()["detail"], r.text
    right = TEXTS[:1] if kind == "text" else [list(PAIRS[0])]
    assert api.post("/predict", params={"task": task}, json={"inputs": right}).status_code == 200


@pytest.mark.parametrize("task", SHIPPED, ids=str)
def test_shipped_tasks_refuse_the_other_input_kind(api, task):
    wrong = [list(PAIRS[0])] if task not in PAIR_TASKS else TEXTS[:1]
    r = api.post("/predict", params={"task": task}, json={"inputs": wrong})
    assert r.status_code == 422 and f"task {task!r} takes" in r.json()["detail"]


def test_upload_through_one_server_reaches_the_other_within_a_second(api, peer, uploaded, backbone):
    import time

    assert predict(peer, "single", TEXTS)["version"] == uploaded["single"]
    v = api.put("/tasks/shared", content=random_bias_set(backbone, "shared", seed=41).to_bytes(),
                headers=ADMIN).json()["version"]
    start = time.monotonic()
    while True:
        r = peer.post("/predict", params={"task": "shared"}, json={"inputs": TEXTS[:1]})
        if r.status_code == 200 and r.json()["version"] == v:
            break
        assert time.monotonic() - start < 1.0, f"peer still answers {r.status_code} {r.text[:200]}"
        time.sleep(0.05)


def test_an_upload_goes_live_without_reading_every_task_in_the_store(api, uploaded, backbone, monkeypatch):
    store = api.app.state.service.store
    scans = []
    monkeypatch.setattr(store, "active_versions", lambda: scans.append(1) or {})  # the O(tasks) scan
    monkeypatch.setattr(store, "generation", lambda: api.app.state.service.generation)  # keep the poller quiet
    v = api.put("/tasks/quick", content=random_bias_set(backbone, "quick", seed=71).to_bytes(), headers=ADMIN)
    assert v.status_code == 201 and predict(api, "quick", TEXTS[:1])["version"] == v.json()["version"]
    assert api.post("/tasks/quick/rollback", headers=ADMIN).status_code == 409  # nothing to roll back to
    assert api.delete("/tasks/quick", headers=ADMIN).status_code == 200
    assert api.post("/predict", params={"task": "quick"}, json={"inputs": TEXTS[:1]}).status_code == 404
    assert scans == []


def test_delete_task_stops_serving_it(api, backbone):
    api.put("/tasks/doomed", content=random_bias_set(backbone, "doomed", seed=51).to_bytes(), headers=ADMIN)
    assert predict(api, "doomed", TEXTS[:1])
    assert api.delete("/tasks/doomed", headers=ADMIN).json() == {"task": "doomed", "version": None}
    r = api.post("/predict", params={"task": "doomed"}, json={"inputs": TEXTS[:1]})
    assert r.status_code == 404 and "GET /tasks" in r.json()["detail"]


def test_delete_version(api, backbone):
    a = api.put("/tasks/vers", content=random_bias_set(backbone, "vers", seed=61).to_bytes(), headers=ADMIN).json()
    b = api.put("/tasks/vers", content=random_bias_set(backbone, "vers", seed=62).to_bytes(), headers=ADMIN).json()
    r = api.delete(f"/tasks/vers/versions/{b['version']}", headers=ADMIN)
    assert r.status_code == 409 and "active" in r.json()["detail"]
    assert api.delete(f"/tasks/vers/versions/{a['version']}", headers=ADMIN).status_code == 200
    r = api.post("/predict", params={"task": "vers", "version": a["version"]}, json={"inputs": TEXTS[:1]})
    assert r.status_code == 404
    assert [v["version"] for v in api.get("/tasks/vers").json()["versions"]] == [b["version"]]


def test_a_damaged_version_in_the_store_is_a_500_naming_the_damage_and_nothing_else_breaks(api, peer, store_dir,
                                                                                           backbone):
    good = api.put("/tasks/harmed", content=random_bias_set(backbone, "harmed", seed=63).to_bytes(),
                   headers=ADMIN).json()["version"]
    bad = api.put("/tasks/harmed", params={"activate": "false"}, headers=ADMIN,
                  content=random_bias_set(backbone, "harmed", seed=64).to_bytes()).json()["version"]
    path = store_dir / "harmed" / "versions" / f"{bad}.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in a tensor: the content no longer matches its hash
    path.write_bytes(bytes(data))
    # the peer never loaded that version, so it reads it from the store, finds the damage and says so
    r = peer.post("/predict", params={"task": "harmed", "version": bad}, json={"inputs": TEXTS[:1]})
    assert r.status_code == 500 and "the store is damaged" in r.json()["detail"], r.text
    assert predict(peer, "harmed", TEXTS[:1])["version"] == good  # the rest of the task is served as before


# -- admin token -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("headers", "status"), [({}, 401), ({"Authorization": "Bearer wrong"}, 401),
                                                 ({"Authorization": TOKEN}, 401)],
                         ids=["no token", "wrong token", "no Bearer scheme"])
def test_admin_calls_refused_without_the_right_token(api, uploaded, backbone, headers, status):
    before = api.get("/tasks").json()
    calls = [("PUT", "/tasks/single", {"content": random_bias_set(backbone, "single", seed=71).to_bytes()}),
             ("POST", "/tasks/single/activate", {"json": {"version": uploaded["single"]}}),
             ("POST", "/tasks/single/rollback", {}), ("DELETE", "/tasks/single", {}),
             ("DELETE", f"/tasks/single/versions/{uploaded['single']}", {})]
    for method, path, kw in calls:
        r = api.request(method, path, headers=headers, **kw)
        assert r.status_code == status, (method, path, r.text)
        assert "Bearer" in r.json()["detail"]
    assert api.get("/tasks").json() == before


def test_admin_refused_when_no_token_is_configured_with_how_to_set_one(peer, backbone):
    r = peer.put("/tasks/x", content=random_bias_set(backbone, "x").to_bytes(), headers=ADMIN)
    assert r.status_code == 403 and "BITFIT_ADMIN_TOKEN" in r.json()["detail"]


# -- limits and errors -------------------------------------------------------------------------------------


def test_unknown_task_is_404_and_says_how_to_list_tasks(api):
    r = api.post("/predict", params={"task": "nope"}, json={"inputs": ["x"]})
    assert r.status_code == 404 and "GET /tasks" in r.json()["detail"]
    assert api.get("/tasks/nope").status_code == 404


def test_unknown_version_is_404(api, uploaded):
    r = api.post("/predict", params={"task": "single", "version": "0123456789abcdef"}, json={"inputs": ["x"]})
    assert r.status_code == 404 and "0123456789abcdef" in r.json()["detail"]


@pytest.mark.parametrize(
    ("body", "needle"),
    [({"inputs": ["x"] * 65}, "BITFIT_MAX_INPUTS"), ({"inputs": ["x" * 2001]}, "BITFIT_MAX_TEXT_CHARS"),
     ({"inputs": []}, "inputs"), ({"inputs": ["x", ["a", "b"]]}, "inputs"), ({"texts": ["x"]}, "inputs"),
     ({"inputs": [["a", "b", "c"]]}, "inputs")],
    ids=["too many inputs", "text too long", "no inputs", "texts mixed with pairs", "wrong key", "triple"],
)
def test_bad_predict_body_is_422_with_a_string_detail(api, uploaded, body, needle):
    r = api.post("/predict", params={"task": "single"}, json=body)
    assert r.status_code == 422 and isinstance(r.json()["detail"], str) and needle in r.json()["detail"]


def test_body_over_the_limit_is_413_declared_or_chunked(api, uploaded):
    big = b'{"inputs": ["' + b"x" * (65 << 10) + b'"]}'
    r = api.post("/predict", params={"task": "single"}, content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "BITFIT_MAX_BODY_BYTES" in r.json()["detail"]
    r = api.post("/predict", params={"task": "single"}, content=iter([big[:40000], big[40000:]]),
                 headers={"Content-Type": "application/json"})  # no Content-Length: chunked
    assert r.status_code == 413


def test_upload_over_the_limit_is_413_and_changes_nothing(api, uploaded):
    before = api.get("/tasks").json()
    r = api.put("/tasks/single", content=b"\0" * (300 << 10), headers=ADMIN)
    assert r.status_code == 413
    assert api.get("/tasks").json() == before


def upload_cases(backbone):
    good = random_bias_set(backbone, "single", ["neg", "pos"], seed=81)
    import dataclasses

    return {
        "not safetensors": ("single", b"definitely not a bias set"),
        "other backbone": ("single", dataclasses.replace(good, fingerprint="f" * 64).to_bytes()),
        "task name differs from the file's": ("other", good.to_bytes()),
        "bad task name": ("Bad.Name", good.to_bytes()),
    }


@pytest.mark.parametrize("case", ["not safetensors", "other backbone", "task name differs from the file's",
                                  "bad task name"], ids=str)
def test_invalid_upload_is_422_and_store_unchanged(api, uploaded, backbone, case):
    task, data = upload_cases(backbone)[case]
    before = api.get("/tasks").json()
    r = api.put(f"/tasks/{task}", content=data, headers=ADMIN)
    assert r.status_code == 422, r.text
    assert isinstance(r.json()["detail"], str)
    assert api.get("/tasks").json() == before


def test_full_queue_answers_503_with_retry_after(api, uploaded):
    runner = api.app.state.service.runner
    with ThreadPoolExecutor(2) as pool, runner.hold():  # release the worker before waiting for the pool
        waiting = [pool.submit(predict, api, "single", ["x"] * 64) for _ in range(2)]  # fills 128 of 128
        import time

        deadline = time.monotonic() + 10
        while runner.queued < 128 and time.monotonic() < deadline:
            time.sleep(0.01)
        r = api.post("/predict", params={"task": "single"}, json={"inputs": ["x"]})
        assert r.status_code == 503 and r.headers["Retry-After"] == "1"
        assert "retry" in r.json()["detail"]
    assert all(len(w.result()["predictions"]) == 64 for w in waiting)


def test_metrics_cover_requests_errors_latency_batches_queue_and_bank(api, uploaded):
    predict(api, "single", TEXTS)
    api.post("/predict", params={"task": "nope"}, json={"inputs": ["x"]})
    text = api.get("/metrics").text
    for needle in ('bitfit_requests_total{task="single"}', 'bitfit_request_errors_total{status="404",task="_unknown"}',
                   'bitfit_request_latency_seconds_bucket{le="0.1",task="single"}',
                   'bitfit_request_inputs_bucket{le="4.0",task="single"}', 'bitfit_batches_total{mode="swap"}',
                   'bitfit_batch_size_bucket{le="4.0",mode="swap"}', "bitfit_queue_depth ", "bitfit_resident_tasks ",
                   "bitfit_bank_bytes "):
        assert needle in text, needle


def test_seeding_adds_only_missing_tasks_and_skips_foreign_files(tmp_path, backbone):
    import dataclasses

    from bias_store import BiasStore
    from server.service import seed_store

    seeds = tmp_path / "seed"
    seeds.mkdir()
    for name in ("alpha", "beta"):
        (seeds / f"{name}.safetensors").write_bytes(random_bias_set(backbone, name, seed=90).to_bytes())
    foreign = dataclasses.replace(random_bias_set(backbone, "gamma"), fingerprint="e" * 64)
    (seeds / "gamma.safetensors").write_bytes(foreign.to_bytes())
    store = BiasStore(tmp_path / "store", ServingSpec.of(backbone))
    mine = store.put("alpha", random_bias_set(backbone, "alpha", seed=91).to_bytes())
    assert seed_store(store, seeds) == ["beta"]
    assert store.active_versions()["alpha"] == mine.version and "gamma" not in store.active_versions()
    assert seed_store(store, seeds) == []
