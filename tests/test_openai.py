"""The OpenAI-compatible API on the real SmolLM2, through real HTTP (uvicorn) and the official `openai` client.

Four generation tasks (the shipped E2E set and three perturbed copies) and one classification task on one server:
concurrent clients of four tasks, streaming and not, get exactly the tokens each task gives alone; version pinning;
errors in OpenAI's shape (unknown model 404, a classifier 400 naming /predict, max_tokens over the limit 400);
a client that disconnects frees its slot; an upload in the middle of a sequence does not change it. Slow (~1 min).
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
import torch

import generation_support as gs
from bitfit.lm import cut_at_stop

pytestmark = pytest.mark.usefixtures("one_torch_thread")

openai = pytest.importorskip("openai", reason="the OpenAI tests need the openai package (pip install 'bitfit-serve[test]')")

TOKEN = "openai-test-token"
N = 10  # max_tokens in most requests: short, on a shared CPU
LIMIT = 40  # the server's max_tokens limit


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base URL, app) of a server with the four generation tasks, an upload target and a classification task."""
    gs.skip_without_smollm2()
    from server.http.app import create_app
    from server.settings import Settings
    from server.testing import random_bias_set, serve

    engine = gs.engine()
    seed = tmp_path_factory.mktemp("seed")
    for i, task in enumerate(gs.TASKS):
        (seed / f"{task}.safetensors").write_bytes(gs.variant(task, i))
    (seed / "e2e-up.safetensors").write_bytes(gs.variant("e2e-up", 0))  # e2e's biases: the upload test's own task
    (seed / "sentiment.safetensors").write_bytes(random_bias_set(engine.backbone, "sentiment").to_bytes())
    settings = Settings(store=str(tmp_path_factory.mktemp("store")), seed_dir=seed, runner="thread",
                        admin_token=TOKEN, max_tokens=LIMIT, generation_slots=8, max_wait_ms=1)
    app = create_app(settings, engine=engine)
    with serve(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def url(server):
    return server[0]


@pytest.fixture(scope="module")
def scheduler(server):
    return server[1].state.generation.scheduler


def client(url: str, **kw):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, **kw)


def expected(task: str, mr: str, n: int = N) -> str:
    """The text the task writes alone (greedy, `bitfit.generate`, plain model), cut at its stop sequence."""
    return cut_at_stop(gs.engine().tokenizer.decode(gs.reference(task, mr, n), skip_special_tokens=True), ["\n"])[0]


def wait_until(check, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


def test_models_lists_the_generation_tasks_with_their_active_versions(url):
    listed = client(url).models.list().data
    ids = [m.id for m in listed]
    assert ids == sorted(gs.TASKS + ("e2e-up",)) and "sentiment" not in ids  # a classifier is no model here
    tasks = httpx.get(url + "/tasks").json()["tasks"]
    active = {t["name"]: t["active"] for t in tasks}
    assert all(m.version == active[m.id] for m in listed)
    paths = httpx.get(url + "/openapi.json").json()["paths"]  # documented, with the scope /predict needs
    assert paths["/v1/completions"]["post"]["x-scope"] == "predict" == paths["/v1/chat/completions"]["post"]["x-scope"]


def test_concurrent_openai_clients_of_4_tasks_get_each_tasks_tokens_alone(url, scheduler):
    jobs = [(task, mr) for task in gs.TASKS for mr in gs.MRS[:2]]  # 8 requests, 4 tasks
    want = {job: expected(*job) for job in jobs}
    for mr in gs.MRS[:2]:
        assert len({want[(t, mr)] for t in gs.TASKS}) > 1  # the tasks differ, so a mix-up would show

    async def ask(c, i, task, mr):
        if i % 4 == 0:  # chat, streamed
            stream = await c.chat.completions.create(model=task, messages=[{"role": "user", "content": mr}],
                                                     max_tokens=N, temperature=0, stream=True)
            return "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])
        if i % 4 == 1:  # completion, streamed
            stream = await c.completions.create(model=task, prompt=mr, max_tokens=N, temperature=0, stream=True)
            return "".join([ch.choices[0].text async for ch in stream if ch.choices])
        if i % 4 == 2:
            r = await c.chat.completions.create(model=task, messages=[{"role": "user", "content": mr}],
                                                max_tokens=N, temperature=0)
            return r.choices[0].message.content
        r = await c.completions.create(model=task, prompt=mr, max_tokens=N, temperature=0)
        assert r.usage.completion_tokens <= N and r.model.startswith(task + "@")
        return r.choices[0].text

    async def main():
        clients = [openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) for _ in jobs]
        try:
            return await asyncio.gather(*(ask(c, i, *job) for i, (c, job) in enumerate(zip(clients, jobs))))
        finally:
            for c in clients:
                await c.close()

    before = scheduler.stats.row_steps, scheduler.stats.steps
    texts = asyncio.run(main())
    for job, text in zip(jobs, texts):
        assert text == want[job], job
    rows, steps = scheduler.stats.row_steps - before[0], scheduler.stats.steps - before[1]
    assert scheduler.stats.max_rows >= 4 and rows / steps > 2  # they shared decode steps


def test_a_pinned_version_answers_and_an_unknown_one_is_404(url):
    version = httpx.get(url + "/tasks/e2e-b").json()["active"]
    r = client(url).completions.create(model=f"e2e-b@{version}", prompt=gs.MRS[0], max_tokens=N, temperature=0)
    assert r.model == f"e2e-b@{version}" and r.choices[0].text == expected("e2e-b", gs.MRS[0])
    with pytest.raises(openai.NotFoundError) as e:
        client(url).completions.create(model="e2e-b@0000000000000000", prompt="x", max_tokens=2)
    assert e.value.code == "model_not_found"


@pytest.mark.parametrize("body, status, param, words", [
    ({"model": "no-such-task", "prompt": "x"}, 404, "model", "does not exist"),
    ({"model": "sentiment", "prompt": "x"}, 400, "model", "POST /predict?task=sentiment"),
    ({"model": "e2e", "prompt": "x", "max_tokens": LIMIT + 1}, 400, "max_tokens", f"limit of {LIMIT}"),
    ({"model": "e2e", "prompt": "x", "temperature": 3}, 400, "temperature", "less than or equal to 2"),
    ({"model": "e2e", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4"),
    ({"model": "e2e", "prompt": "x", "n": 2}, 400, "n", "1"),
    ({"prompt": "x"}, 400, "model", "Field required"),
], ids=["unknown-model", "classifier", "max-tokens", "temperature", "stops", "n", "no-model"])
def test_completion_errors_come_in_openai_shape(url, body, status, param, words):
    r = httpx.post(url + "/v1/completions", json=body, timeout=30)
    error = r.json()["error"]
    assert r.status_code == status and error["param"] == param and words in error["message"], error
    assert error["type"] == "invalid_request_error" and set(error) == {"message", "type", "param", "code"}


def test_chat_errors_and_the_official_clients_exceptions(url):
    c = client(url)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="sentiment", messages=[{"role": "user", "content": "x"}])
    assert "/predict" in e.value.message and e.value.param == "model"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="e2e", messages=[{"role": "system", "content": "be brief"},
                                                         {"role": "user", "content": "x"}])
    assert "exactly one user message" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="e2e", messages=[{"role": "user", "content": "x"}],
                                  max_completion_tokens=LIMIT + 1)
    assert e.value.param == "max_completion_tokens"
    r = httpx.post(url + "/predict?task=e2e", json={"inputs": ["x"]})
    assert r.status_code == 422 and "/v1/completions" in r.json()["detail"]


def test_stop_sequence_ends_the_text_before_it_streaming_or_not(url):
    full = expected("e2e", gs.MRS[0])
    stop = " coffee"
    assert stop in full
    r = client(url).completions.create(model="e2e", prompt=gs.MRS[0], max_tokens=N, temperature=0, stop=[stop])
    assert r.choices[0].text == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"
    stream = client(url).completions.create(model="e2e", prompt=gs.MRS[0], max_tokens=N, temperature=0,
                                            stop=stop, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == full[: full.index(stop)]
    assert chunks[-1].usage.completion_tokens < N and chunks[-1].usage.prompt_tokens > 0


def test_seeded_sampling_repeats(url):
    ask = dict(model="e2e-c", prompt=gs.MRS[2], max_tokens=6, temperature=1.0, top_p=0.9, seed=42)
    assert client(url).completions.create(**ask).choices[0].text == client(url).completions.create(**ask).choices[0].text


def test_stream_ends_with_done(url):
    with httpx.stream("POST", url + "/v1/completions", json={"model": "e2e", "prompt": "x", "max_tokens": 2,
                                                               "stream": True}, timeout=30) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    assert json.loads(lines[0][6:])["object"] == "text_completion"


def metric(url: str, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics").text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_metrics_count_each_tasks_generated_tokens_and_the_errors_by_status(url):
    before = {n: metric(url, n, task="e2e-b") for n in ("bitfit_generation_requests_total",
                                                         "bitfit_generation_prompt_tokens_total",
                                                         "bitfit_generation_completion_tokens_total",
                                                         "bitfit_generation_first_token_seconds_count")}
    errors = metric(url, "bitfit_generation_errors_total", status="404")
    r = client(url).completions.create(model="e2e-b", prompt=gs.MRS[1], max_tokens=N, temperature=0)
    chunks = list(client(url).chat.completions.create(model="e2e-b", messages=[{"role": "user", "content": gs.MRS[2]}],
                                                      max_tokens=N, temperature=0, stream=True,
                                                      stream_options={"include_usage": True}))
    with pytest.raises(openai.NotFoundError):
        client(url).completions.create(model="no-such-task", prompt="x", max_tokens=2)
    used = [r.usage, chunks[-1].usage]
    after = {n: metric(url, n, task="e2e-b") for n in before}
    assert after["bitfit_generation_requests_total"] - before["bitfit_generation_requests_total"] == 2
    assert after["bitfit_generation_first_token_seconds_count"] - before["bitfit_generation_first_token_seconds_count"] == 2
    assert (after["bitfit_generation_prompt_tokens_total"] - before["bitfit_generation_prompt_tokens_total"]
            == sum(u.prompt_tokens for u in used))
    assert (after["bitfit_generation_completion_tokens_total"] - before["bitfit_generation_completion_tokens_total"]
            == sum(u.completion_tokens for u in used) > 0)
    assert metric(url, "bitfit_generation_errors_total", status="404") == errors + 1
    assert metric(url, "bitfit_generation_requests_total", task="no-such-task") == 0  # unknown names add no label


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "no-stream"])
def test_a_client_that_disconnects_frees_its_slot(url, scheduler, stream):
    assert wait_until(lambda: scheduler.active == 0)
    cancelled, tokens = scheduler.stats.cancelled, scheduler.stats.tokens
    body = {"model": "e2e", "prompt": gs.MRS[3], "max_tokens": LIMIT, "temperature": 0, "stream": stream,
            "stop": ["never-appears"]}
    if stream:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
            next(r.iter_lines())  # the first token arrived: the sequence is running; then hang up
            assert scheduler.active == 1
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/completions", json=body, timeout=httpx.Timeout(30, read=1.0))
    assert wait_until(lambda: scheduler.active == 0, timeout=5)
    assert scheduler.stats.cancelled == cancelled + 1
    assert scheduler.stats.tokens - tokens < LIMIT  # it stopped before its natural end


def test_upload_in_the_middle_of_a_sequence_does_not_change_it(url, scheduler):
    want = expected("e2e", gs.MRS[1], 24)  # e2e-up holds e2e's biases until the upload
    new_set = gs.variant("e2e-up", 17, scale=4.0)
    body = {"model": "e2e-up", "prompt": gs.MRS[1], "max_tokens": 24, "temperature": 0, "stream": True}
    text, uploaded_after = [], None
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            text.append(json.loads(line[6:])["choices"][0]["text"])
            if len(text) == 2:
                put = httpx.put(url + "/tasks/e2e-up", content=new_set, timeout=60,
                                headers={"Authorization": f"Bearer {TOKEN}"})
                assert put.status_code == 201, put.text
                uploaded_after = len(text)
    assert uploaded_after == 2 and len(text) > 3  # the upload went live while the sequence still ran
    assert "".join(text) == want
    after = client(url).completions.create(model="e2e-up", prompt=gs.MRS[1], max_tokens=24, temperature=0)
    assert after.model == f"e2e-up@{put.json()['version']}"  # requests that start later get the new version
    assert after.choices[0].text != want


def test_bitfit_serve_backbone_smollm2_seeds_e2e_and_serves_it_from_its_engine_process(tmp_path):
    """The default deployment: `bitfit serve --backbone smollm2`, the engine (and the scheduler) in its own
    process; the shipped E2E set is seeded and answers as it does alone."""
    gs.skip_without_smollm2()
    from serve_process import ServeProcess

    proc = ServeProcess(str(tmp_path / "store"), {"BITFIT_THREADS": "1"}, extra=["--backbone", "smollm2"],
                        log=tmp_path / "serve.log")
    try:
        proc.wait_ready()
        c = client(proc.url)
        assert [m.id for m in c.models.list().data] == ["e2e"]
        r = c.chat.completions.create(model="e2e", messages=[{"role": "user", "content": gs.MRS[0]}], max_tokens=N,
                                      temperature=0)
        assert r.choices[0].message.content == expected("e2e", gs.MRS[0])
        stream = c.completions.create(model="e2e", prompt=gs.MRS[1], max_tokens=N, temperature=0, stream=True)
        assert "".join(ch.choices[0].text for ch in stream if ch.choices) == expected("e2e", gs.MRS[1])
    finally:
        proc.stop()
