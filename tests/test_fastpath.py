"""The /predict fast path answers exactly what the FastAPI route answers — status, body and headers — for good
requests and bad ones alike; it serves the well-formed requests itself and hands every other one to FastAPI."""

from __future__ import annotations

import json

import httpx
import pytest

from server.http.app import create_app
from server.http.fastpath import PredictFastPath, simple_query
from server.settings import Settings
from server.testing import fresh_engine, minilm, random_bias_set, serve

TOKEN = "fast-path-token"
TEXT, PAIR = ["a gripping, beautifully acted film", "dull"], [["A man sings.", "Someone sings."]]
JSON = {"Content-Type": "application/json"}

# (id, query string, body (bytes, or an object sent as JSON), headers, served by the fast path)
CASES = [
    ("text task", "task=single", {"inputs": TEXT}, JSON, True),
    ("pair task", "task=pair", {"inputs": PAIR}, JSON, True),
    ("regression task", "task=score", {"inputs": PAIR}, JSON, True),
    ("version given first", "version={v}&task=single", {"inputs": TEXT}, JSON, True),
    ("unknown task", "task=nosuch", {"inputs": TEXT}, JSON, True),
    ("unknown version", "task=single&version=0123456789abcdef", {"inputs": TEXT}, JSON, True),
    ("wrong input kind", "task=single", {"inputs": PAIR}, JSON, True),
    ("too many inputs", "task=single", {"inputs": ["x"] * 9}, JSON, True),
    ("text too long", "task=single", {"inputs": ["x" * 3000]}, JSON, True),
    ("extra body field", "task=single", {"inputs": TEXT, "other": 1}, JSON, True),
    ("bad task name", "task=SST2", {"inputs": TEXT}, JSON, False),
    ("no task", "", {"inputs": TEXT}, JSON, False),
    ("task twice", "task=single&task=pair", {"inputs": TEXT}, JSON, False),
    ("unknown parameter", "task=single&x=1", {"inputs": TEXT}, JSON, False),
    ("bad version", "task=single&version=nope", {"inputs": TEXT}, JSON, False),
    ("empty inputs", "task=single", {"inputs": []}, JSON, False),
    ("inputs not a list", "task=single", {"inputs": "text"}, JSON, False),
    ("mixed kinds", "task=single", {"inputs": ["a", ["b", "c"]]}, JSON, False),
    ("body not JSON", "task=single", b"{inputs: [", JSON, False),
    ("no content type", "task=single", json.dumps({"inputs": TEXT}).encode(), {}, False),
]


@pytest.fixture(scope="module")
def backbone():
    return minilm()


@pytest.fixture(scope="module")
def api(tmp_path_factory, backbone):
    settings = Settings(store=tmp_path_factory.mktemp("store"), admin_token=TOKEN, seed=False, max_inputs=8,
                        max_text_chars=2000)
    app = create_app(settings, fresh_engine())
    with serve(app) as url, httpx.Client(base_url=url, timeout=120) as client:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        client.versions = {}
        for name, labels, kind in (("single", ["neg", "pos"], "text"), ("pair", ["y", "n", "m"], "pair"),
                                   ("score", [], "pair")):
            s = random_bias_set(backbone, name, labels, seed=len(name), input_kind=kind)
            client.versions[name] = client.put(f"/tasks/{name}", content=s.to_bytes(), headers=auth).json()["version"]
        client.app = app
        yield client


def ask(api, query, body, headers):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return api.post(f"/predict?{query.format(v=api.versions['single'])}", content=content, headers=headers)


def answer(r: httpx.Response) -> tuple:
    keep = {k: v for k, v in r.headers.items() if k in ("content-type", "retry-after", "www-authenticate")}
    return r.status_code, r.json(), keep


@pytest.mark.parametrize(("query", "body", "headers", "fast"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_fast_path_answers_as_the_route_does(api, monkeypatch, query, body, headers, fast):
    served = []
    original = PredictFastPath.predict

    async def spy(self, *args):
        served.append(args[1])
        return await original(self, *args)

    monkeypatch.setattr(PredictFastPath, "predict", spy)
    settings = api.app.state.settings
    settings.fast_predict = True
    via_fast = answer(ask(api, query, body, headers))
    assert bool(served) == fast, f"fast path served it: {bool(served)}, expected {fast}"
    settings.fast_predict = False
    try:
        via_route = answer(ask(api, query, body, headers))
    finally:
        settings.fast_predict = True
    assert len(served) == int(fast), "with the fast path off, the route answered alone"
    assert via_fast == via_route


@pytest.mark.parametrize("header", [None, "Bearer wrong", f"Bearer {TOKEN}"], ids=["no token", "wrong", "admin"])
def test_access_rule_applies_on_the_fast_path_too(api, header):
    settings = api.app.state.settings
    headers = JSON | ({"Authorization": header} if header else {})
    settings.predict_auth = True
    try:
        answers = []
        for fast in (True, False):
            settings.fast_predict = fast
            answers.append(answer(ask(api, "task=single", {"inputs": TEXT}, headers)))
    finally:
        settings.predict_auth, settings.fast_predict = False, True
    assert answers[0] == answers[1]
    assert answers[0][0] == {None: 401, "Bearer wrong": 401}.get(header, 403)  # an admin token has no predict scope


@pytest.mark.parametrize(("query", "want"), [
    (b"task=sst2", ("sst2", None)), (b"task=sst2&version=0123456789abcdef", ("sst2", "0123456789abcdef")),
    (b"", None), (b"task=", None), (b"task=a&task=b", None), (b"task=a&v=1", None), (b"task=%FF", None),
    (b"task=a%20b", None), (b"task=a&&version=x", None),
], ids=["task", "task and version", "empty", "blank task", "twice", "other name", "not ascii", "space", "malformed"])
def test_simple_query_takes_only_the_plain_form(query, want):
    assert simple_query(query) == want
