"""The Open Inference Protocol (V2), through a real uvicorn server, with the official tritonclient from PyPI.

The shipped tasks cover the three shapes: sst2 (single texts), mrpc (pairs) and stsb (pairs, regression). Every
V2 answer is compared with /predict's for the same inputs, on the real MiniLM.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from server.http.app import create_app
from server.settings import Settings
from server.testing import fresh_engine, serve

TEXTS = ["an utterly charming film", "boring", "the plot made no sense, but the actors tried their best"]
PAIRS = [("A man plays a guitar.", "Someone makes music."), ("Cats sleep.", "The market fell.")]
INPUTS = {"sst2": TEXTS, "mrpc": PAIRS, "stsb": PAIRS}
LIMITS = dict(max_inputs=16, max_text_chars=2000, max_body_bytes=64 << 10, max_wait_ms=20, poll_interval_s=0.1)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    app = create_app(Settings(store=tmp_path_factory.mktemp("store"), **LIMITS), fresh_engine())
    with serve(app) as url, httpx.Client(base_url=url, timeout=120) as http:
        http.app = app
        yield http


@pytest.fixture(scope="module")
def client(server):
    with triton.InferenceServerClient(url=str(server.base_url).removeprefix("http://").rstrip("/")) as c:
        yield c


def predict(http, task, inputs):
    r = http.post("/predict", params={"task": task}, json={"inputs": [list(x) if isinstance(x, tuple) else x
                                                                      for x in inputs]})
    assert r.status_code == 200, r.text
    return r.json()


def texts_of(array) -> list[str]:
    """A BYTES output as text: bytes when it came as binary data, str when it came in the JSON."""
    return [x.decode() if isinstance(x, bytes) else x for x in array]


def triton_inputs(task, binary: bool) -> list:
    rows = INPUTS[task]
    columns = {"text": [r if isinstance(r, str) else r[0] for r in rows]}
    if not isinstance(rows[0], str):
        columns["text_pair"] = [r[1] for r in rows]
    out = []
    for name, texts in columns.items():
        tensor = triton.InferInput(name, [len(texts)], "BYTES")
        tensor.set_data_from_numpy(np.array(texts, dtype=object), binary_data=binary)
        out.append(tensor)
    return out


def outputs_for(task, binary: bool):
    names = ["value"] if task == "stsb" else ["label", "scores"]
    return [triton.InferRequestedOutput(n, binary_data=binary) for n in names]


# -- inference -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [True, False], ids=["binary tensors", "JSON tensors"])
@pytest.mark.parametrize("task", ["sst2", "mrpc", "stsb"], ids=["single text", "pair", "regression"])
def test_tritonclient_infer_equals_predict(server, client, task, binary):
    want = predict(server, task, INPUTS[task])
    result = client.infer(task, triton_inputs(task, binary), outputs=outputs_for(task, binary), request_id=f"req-{task}")
    response = result.get_response()
    assert response["model_name"] == task and response["model_version"] == want["version"]
    assert response["id"] == f"req-{task}"
    preds = want["predictions"]
    if task == "stsb":
        value = result.as_numpy("value")
        assert value.dtype == np.float32 and value.shape == (len(preds),)
        torch.testing.assert_close(torch.tensor(value), torch.tensor([p["value"] for p in preds]),
                                   atol=1e-5, rtol=1e-5, check_dtype=False)
        return
    labels = list(preds[0]["scores"])
    assert texts_of(result.as_numpy("label")) == [p["label"] for p in preds]
    scores = result.as_numpy("scores")
    assert scores.dtype == np.float32 and scores.shape == (len(preds), len(labels))
    torch.testing.assert_close(torch.tensor(scores), torch.tensor([[p["scores"][lab] for lab in labels]
                                                                       for p in preds]),
                               atol=1e-6, rtol=1e-5, check_dtype=False)


def test_default_request_gets_every_output_in_binary_and_no_id_is_fine(server, client):
    result = client.infer("sst2", triton_inputs("sst2", True))  # no outputs named: tritonclient asks all, binary
    response = result.get_response()
    assert "id" not in response
    assert [o["name"] for o in response["outputs"]] == ["label", "scores"]
    assert all("binary_data_size" in o["parameters"] for o in response["outputs"])
    want = predict(server, "sst2", TEXTS)
    assert texts_of(result.as_numpy("label")) == [p["label"] for p in want["predictions"]]


def test_a_compressed_request_is_answered_like_a_plain_one(server, client):
    plain = client.infer("sst2", triton_inputs("sst2", True), outputs=outputs_for("sst2", False))
    for algorithm in ("gzip", "deflate"):
        packed = client.infer("sst2", triton_inputs("sst2", True), outputs=outputs_for("sst2", False),
                              request_compression_algorithm=algorithm)
        assert packed.get_response() == plain.get_response(), algorithm


def test_a_named_version_answers_and_says_so(server, client):
    version = server.get("/tasks/sst2").json()["active"]
    result = client.infer("sst2", triton_inputs("sst2", False), model_version=version, outputs=outputs_for("sst2", False))
    assert result.get_response()["model_version"] == version


def test_a_v2_request_and_a_predict_request_share_one_forward(server):
    runner, metrics = server.app.state.service.runner, server.app.state.metrics
    body = {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": TEXTS[:2]}]}
    before = sum(metrics.batches.labels(m)._value.get() for m in ("swap", "gather", "group"))
    with ThreadPoolExecutor(2) as pool:
        with runner.hold():
            v2 = pool.submit(server.post, "/v2/models/sst2/infer", json=body)
            rest = pool.submit(server.post, "/predict", params={"task": "mrpc"}, json={"inputs": [list(PAIRS[0])]})
            deadline = time.monotonic() + 10
            while runner.queued < 3 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert runner.queued == 3
        assert v2.result().status_code == 200 and rest.result().status_code == 200
    after = sum(metrics.batches.labels(m)._value.get() for m in ("swap", "gather", "group"))
    assert after - before == 1


# -- metadata, health, readiness -----------------------------------------------------------------------------


@pytest.mark.parametrize(("task", "inputs", "outputs"), [
    ("sst2", ["text"], [("label", "BYTES", [-1]), ("scores", "FP32", [-1, 2])]),
    ("mrpc", ["text", "text_pair"], [("label", "BYTES", [-1]), ("scores", "FP32", [-1, 2])]),
    ("stsb", ["text", "text_pair"], [("value", "FP32", [-1])]),
], ids=["single text", "pair", "regression"])
def test_model_metadata_names_inputs_outputs_labels_and_versions(server, client, task, inputs, outputs):
    meta = client.get_model_metadata(task)
    stored = server.get(f"/tasks/{task}").json()
    assert meta["name"] == task and meta["versions"] == [v["version"] for v in stored["versions"]]
    assert [(i["name"], i["datatype"], i["shape"]) for i in meta["inputs"]] == [(n, "BYTES", [-1]) for n in inputs]
    assert [(o["name"], o["datatype"], o["shape"]) for o in meta["outputs"]] == outputs
    assert meta["parameters"]["labels"] == stored["versions"][-1]["labels"]
    assert meta["parameters"]["version"] == meta["parameters"]["active_version"] == stored["active"]
    if task != "stsb":  # labels in the order of scores: the order /predict's scores come in
        assert meta["parameters"]["labels"] == list(predict(server, task, INPUTS[task])["predictions"][0]["scores"])


def test_server_health_readiness_and_model_readiness(server, client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.get_server_metadata() == {"name": "bitfit-serve", "version": server.app.version,
                                            "extensions": ["binary_tensor_data"]}
    assert client.is_model_ready("sst2")
    version = server.get("/tasks/sst2").json()["active"]
    assert client.is_model_ready("sst2", model_version=version)
    assert not client.is_model_ready("nope")
    assert not client.is_model_ready("sst2", model_version="0123456789abcdef")


# -- errors: the protocol's {"error"} body, /predict's status codes --------------------------------------------


def v2(name, shape, data, datatype="BYTES"):
    return {"name": name, "shape": shape, "datatype": datatype, "data": data}


ERRORS = [
    ("unknown task", "/v2/models/nope/infer", {"inputs": [v2("text", [1], ["x"])]}, 404, "'nope' is not in the store"),
    ("unknown version", "/v2/models/sst2/versions/0123456789abcdef/infer", {"inputs": [v2("text", [1], ["x"])]}, 404,
     "0123456789abcdef"),
    ("pair task without text_pair", "/v2/models/mrpc/infer", {"inputs": [v2("text", [1], ["x"])]}, 422,
     "takes inputs text and text_pair"),
    ("single-text task with text_pair", "/v2/models/sst2/infer",
     {"inputs": [v2("text", [1], ["x"]), v2("text_pair", [1], ["y"])]}, 422, "takes inputs text; this request sent"),
    ("wrong datatype", "/v2/models/sst2/infer", {"inputs": [v2("text", [1], [1.0], "FP32")]}, 422, "datatype"),
    ("unknown input name", "/v2/models/sst2/infer", {"inputs": [v2("texts", [1], ["x"])]}, 422, "inputs.0.name"),
    ("shape and data disagree", "/v2/models/sst2/infer", {"inputs": [v2("text", [3], ["x"])]}, 422,
     "has shape [3] but 1 elements"),
    ("no data", "/v2/models/sst2/infer", {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES"}]}, 422,
     "has no data"),
    ("output the task lacks", "/v2/models/stsb/infer",
     {"inputs": [v2("text", [1], ["a"]), v2("text_pair", [1], ["b"])], "outputs": [{"name": "scores"}]}, 422,
     "has no output 'scores'; its outputs are value"),
    ("too many inputs", "/v2/models/sst2/infer", {"inputs": [v2("text", [17], ["x"] * 17)]}, 422, "BITFIT_MAX_INPUTS"),
    ("text too long", "/v2/models/sst2/infer", {"inputs": [v2("text", [1], ["x" * 2001])]}, 422, "BITFIT_MAX_TEXT_CHARS"),
    ("shared memory", "/v2/models/sst2/infer", {"inputs": [v2("text", [1], ["x"])], "outputs": [
        {"name": "label", "parameters": {"shared_memory_region": "r", "shared_memory_byte_size": 64}}]}, 422,
     "shared memory is not supported"),
    ("classification extension", "/v2/models/sst2/infer", {"inputs": [v2("text", [1], ["x"])], "outputs": [
        {"name": "label", "parameters": {"classification": 2}}]}, 422, "classification extension is not supported"),
    ("bad task name", "/v2/models/Bad.Name/infer", {"inputs": [v2("text", [1], ["x"])]}, 422, "upper-case"),
    ("unknown path", "/v2/models/sst2/explain", {"inputs": []}, 404, "Not Found"),
]


@pytest.mark.parametrize(("path", "body", "status", "needle"), [c[1:] for c in ERRORS], ids=[c[0] for c in ERRORS])
def test_v2_errors_have_the_protocol_body_and_predicts_status(server, path, body, status, needle):
    r = server.post(path, json=body)
    assert r.status_code == status, r.text
    assert list(r.json()) == ["error"] and needle in r.json()["error"], r.text


SHORT = b'{"inputs":[{"name":"text","shape":[1],"datatype":"BYTES","parameters":{"binary_data_size":9}}]}'


@pytest.mark.parametrize(("body", "headers", "status", "needle"), [
    (b"{not json", {}, 422, "Invalid JSON"),
    (b'{"inputs": []}', {"Inference-Header-Content-Length": "99"}, 422, "at most the body's"),
    (SHORT + b"\1\0\0\0x", {"Inference-Header-Content-Length": str(len(SHORT))}, 422, "claims 9 bytes"),
    (b"x" * (65 << 10), {}, 413, "BITFIT_MAX_BODY_BYTES"),
    (b"\x1f\x8b not gzip", {"Content-Encoding": "gzip"}, 422, "not valid gzip"),
], ids=["malformed JSON", "header length past the body", "binary data shorter than declared", "body over the limit",
        "corrupt gzip"])
def test_malformed_v2_bodies_are_refused_with_the_protocol_body(server, body, headers, status, needle):
    r = server.post("/v2/models/sst2/infer", content=body, headers=headers)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"], r.text


def test_tritonclient_raises_the_servers_message_and_status(client):
    with pytest.raises(InferenceServerException) as e:
        client.infer("mrpc", triton_inputs("sst2", True))
    assert e.value.status() == "422" and "takes inputs text and text_pair" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata("nope")
    assert e.value.status() == "404" and "'nope'" in e.value.message()


def test_not_ready_is_503_in_the_protocol_body(server, monkeypatch):
    monkeypatch.setattr(server.app.state.service, "ready", False)
    r = server.get("/v2/health/ready")
    assert r.status_code == 503 and "starting" in r.json()["error"]
    assert server.get("/v2/health/live").json() == {"live": True}


def test_v2_inference_is_counted_per_task_like_predict(server):
    requests = server.app.state.metrics.requests.labels("sst2")
    before = requests._value.get()
    assert server.post("/v2/models/sst2/infer", json={"inputs": [v2("text", [1], ["fine"])]}).status_code == 200
    assert requests._value.get() == before + 1
    assert 'bitfit_requests_total{task="sst2"}' in server.get("/metrics").text
