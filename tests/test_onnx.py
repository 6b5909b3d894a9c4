"""The ONNX Runtime backend: the exported graph reads every bias per row from one input, so its outputs equal the
torch engine's for swap and for mixed batches of many tasks (pair, regression, pooler); an upload goes live with no
re-export; a damaged cache entry is rebuilt; int8 stays within its stated tolerance.

The real MiniLM is exported once per test session into a tmp cache (about 12 s on an idle core, 30 s on the busy
2-core CI machine; int8 quantisation about 10 s more); cache behaviour is tested on a tiny BERT (a second each).
"""

from __future__ import annotations

import copy
import json
import os

import httpx
import pytest
import torch

from bitfit.backbone import finish_backbone
from server.runtime import onnx_export
from server.runtime.onnx_export import BIASES, ExportFailed, ensure_graph, entry_paths
from server.settings import Settings
from server.testing import alone, fresh_engine, minilm, random_bias_set, serve

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed (pip install 'bitfit-serve[onnx]')")

from server.runtime.onnx_engine import OrtEngine  # noqa: E402

FP32 = dict(atol=1e-4, rtol=1e-4)  # the bound: ORT fp32 against the torch engine
# int8 weights (dynamic quantisation, per channel) move these random tasks' logits (up to 10 in size) by up to
# 0.41, measured; the shipped tasks' by up to 0.84 over their dev sets (STS-B), whose accuracy bench/onnx_accuracy.py prints.
# The bound is stated here, and the lower bound shows that the int8 graph is what runs.
INT8_MAX_ABS = 0.6
TOKEN = "onnx-test-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
TEXTS = ["a gripping, beautifully acted film", "dull.", "I expected more from the director of such a fine debut",
         "not bad at all", "the worst two hours of my year, and the popcorn was stale too"]
PAIRS = [("A man is playing a guitar.", "Someone plays music."), ("The cat sleeps.", "A stock market crashed."),
         ("Two dogs run in a field.", "Dogs are running outside on the grass."), ("Hi", "Hello")]


# -- fixtures: one export per session --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def onnx_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="module")
def backbone():
    return minilm()


@pytest.fixture(scope="module")
def tasks(backbone):
    """Two single-text tasks sharing a head, a 3-label pair task through BERT's pooler, a regression task."""
    return {
        "sent": (random_bias_set(backbone, "sent", seed=1, head_seed=7), TEXTS),
        "sent_b": (random_bias_set(backbone, "sent_b", seed=2, head_seed=7), TEXTS[::-1]),
        "nli": (random_bias_set(backbone, "nli", ["entail", "neutral", "contra"], pooling="pooler", seed=3), PAIRS),
        "sts": (random_bias_set(backbone, "sts", [], pooling="cls", seed=4), PAIRS[::-1]),
    }


def loaded(engine, tasks):
    for name, (bias_set, _) in tasks.items():
        engine.bank.load(name, bias_set)
    return engine


@pytest.fixture(scope="module")
def ort32(backbone, tasks, onnx_cache):
    return loaded(OrtEngine(backbone, cache_dir=onnx_cache, threads=1), tasks)


@pytest.fixture(scope="module")
def torch32(tasks):
    return loaded(fresh_engine(), tasks)


def interleave(tasks, engine):
    names = list(tasks)
    order = [(n, i) for i in range(max(len(items) for _, items in tasks.values())) for n in names
             if i < len(tasks[n][1])]
    return order, [tasks[n][1][i] for n, i in order], [engine.bank.row(n) for n, _ in order]


def both(ort, tch, items, rows, mode=None):
    got = ort.run(ort.encode(items)[0], rows, mode)
    want = tch.run(tch.encode(items)[0], rows, mode)
    return got, want


# -- fp32 equals the torch engine ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sent", "sent_b", "nli", "sts"],
                         ids=["single text", "single text, other biases", "pair task through the pooler", "regression"])
def test_fp32_swap_batch_equals_the_torch_engine(ort32, torch32, tasks, name):
    items = tasks[name][1]
    got, want = both(ort32, torch32, items, [ort32.bank.row(name)] * len(items))
    assert got.mode == want.mode == "swap" and got.widths == want.widths
    torch.testing.assert_close(got.logits, want.logits, **FP32)


@pytest.mark.slow
def test_fp32_mixed_batch_equals_the_torch_engine_and_each_task_alone(ort32, torch32, tasks, backbone):
    order, items, rows = interleave(tasks, ort32)
    got, want = both(ort32, torch32, items, rows)
    assert got.mode == "gather"
    torch.testing.assert_close(got.logits, want.logits, **FP32)
    reference = {n: alone(backbone, s, its) for n, (s, its) in tasks.items()}
    for (name, i), out in zip(order, got.outputs):
        torch.testing.assert_close(out, reference[name][i], **FP32, msg=lambda m: f"{name}[{i}]: {m}")


@pytest.mark.slow
def test_fp32_batch_of_32_rows_from_32_tasks_equals_the_torch_engine(ort32, backbone, onnx_cache):
    sets = [random_bias_set(backbone, f"t{i}", [f"l{j}" for j in range(2 + i % 3)] if i % 4 else [],
                            pooling=("mean", "cls", "pooler", "mean")[i % 4], seed=100 + i) for i in range(32)]
    ort, tch = OrtEngine(backbone, cache_dir=onnx_cache, threads=1), fresh_engine()
    for s in sets:
        ort.bank.load(s.task, s)
        tch.bank.load(s.task, s)
    items = [TEXTS[i % len(TEXTS)] if i % 2 else PAIRS[i % len(PAIRS)] for i in range(32)]
    rows = [ort.bank.row(s.task) for s in sets]
    got, want = both(ort, tch, items, rows)
    assert got.mode == "gather" and got.widths == want.widths == [s.num_outputs for s in sets]
    torch.testing.assert_close(got.logits, want.logits, **FP32)
    assert not ort.graph.built  # the session's other engines exported it already: the cache was used


@pytest.mark.slow
@pytest.mark.parametrize(
    "items",
    [["dull."], TEXTS[:2] + TEXTS[:2], ["word " * 300, "short"], [("a", "word " * 300)], ["no padding", "no padding"]],
    ids=["one input", "repeated rows", "truncated to 128 with padding", "truncated pair", "no padding"],
)
def test_fp32_equals_the_torch_engine_whatever_the_batch_shape(ort32, torch32, items):
    # the graph is traced on one padded batch of two: batch size, length and padding must all stay inputs
    rows = [ort32.bank.row("sent" if isinstance(x, str) else "nli") for x in items]
    got, want = both(ort32, torch32, items, rows)
    torch.testing.assert_close(got.logits, want.logits, **FP32)


@pytest.mark.slow
def test_group_mode_equals_gather(ort32, tasks):
    _, items, rows = interleave(tasks, ort32)
    batch = ort32.encode(items)[0]
    gather, group = ort32.run(batch, rows, "gather"), ort32.run(batch, rows, "group")
    assert group.mode == "group" and group.widths == gather.widths
    for g, w in zip(group.outputs, gather.outputs):  # past its width, a row's padding is not an output
        torch.testing.assert_close(g, w, **FP32)


@pytest.mark.slow
def test_swap_refuses_several_tasks_and_run_refuses_an_empty_row(ort32, tasks):
    _, items, rows = interleave(tasks, ort32)
    with pytest.raises(ValueError, match="one task per batch"):
        ort32.run(ort32.encode(items)[0], rows, "swap")
    with pytest.raises(KeyError, match="holds no task"):
        ort32.run(ort32.encode(["x"])[0], [ort32.bank.capacity + 5])


@pytest.mark.slow
def test_one_session_with_the_configured_threads_and_biases_as_its_one_bias_input(ort32):
    options = ort32.session.get_session_options()
    assert options.intra_op_num_threads == 1
    names = [i.name for i in ort32.session.get_inputs()]
    assert names[-1] == BIASES and ort32.session.get_inputs()[-1].shape[1] == ort32.spec.layout_size
    # the graph holds no bias of its own: every one comes from the input (nothing baked in to go stale)
    import onnx

    model = onnx.load(str(ort32.graph.path), load_external_data=False)
    assert not [t.name for t in model.graph.initializer if t.name.endswith(".bias")]


@pytest.mark.slow
def test_smollm2_exports_and_a_mixed_batch_with_last_token_pooling_equals_the_torch_engine(tmp_path):
    # a decoder with injected biases (no bias of its own): left-padded last-token pooling and 3 tasks in one batch
    from bitfit.backbone import load_backbone

    smol = load_backbone("smollm2")
    sets = [random_bias_set(smol, f"t{i}", pooling="last", seed=i, scale=0.05) for i in range(3)]
    ort = loaded(OrtEngine(copy.deepcopy(smol), cache_dir=tmp_path, threads=1), {s.task: (s, None) for s in sets})
    tch = loaded(fresh_engine(smol), {s.task: (s, None) for s in sets})
    items = ["name[The Eagle], food[French]", "a much longer meaning representation, with more words in it", "hi"]
    got, want = both(ort, tch, items, [ort.bank.row(s.task) for s in sets])
    assert got.mode == "gather"
    torch.testing.assert_close(got.logits, want.logits, **FP32)


# -- int8 ------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_int8_outputs_stay_within_the_stated_tolerance_of_torch_fp32(ort32, backbone, tasks, torch32, onnx_cache):
    int8 = loaded(OrtEngine(backbone, quantize="int8", cache_dir=onnx_cache, threads=1), tasks)
    assert int8.graph.path.name.endswith("-int8.onnx") and int8.graph.path.stat().st_size < 40e6  # ~4x smaller
    order, items, rows = interleave(tasks, int8)
    got, want = both(int8, torch32, items, rows)
    diff = (got.logits - want.logits).abs().max().item()
    assert 1e-4 < diff <= INT8_MAX_ABS, diff
    for (name, _), g, w in zip(order, got.outputs, want.outputs):  # the same label wherever fp32 is decisive
        if len(w) > 1 and (w.max() - w.topk(2).values[1]) > 2 * INT8_MAX_ABS:
            assert g.argmax() == w.argmax(), name


# -- upload through HTTP: live, no re-export -------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("runner", ["thread", "process"], ids=["engine on a thread", "engine in its own process"])
def test_upload_through_http_goes_live_with_no_re_export(ort32, backbone, onnx_cache, tmp_path, monkeypatch, runner):
    import onnxruntime as ort

    graph = ort32.graph.path
    before = (graph.stat().st_mtime_ns, graph.stat().st_size, onnx_export.file_digest(graph))
    sessions = []
    real_init = ort.InferenceSession.__init__

    def counting_init(self, *args, **kwargs):  # a spy: the real constructor runs
        sessions.append(args[0] if args else kwargs.get("path_or_bytes"))
        real_init(self, *args, **kwargs)

    # ort_threads, not threads: threads would also set torch's for the whole test process
    settings = Settings(store=tmp_path / "store", admin_token=TOKEN, backend="onnxruntime", onnx_cache=onnx_cache,
                        ort_threads=1, max_wait_ms=2, runner=runner)
    from server.http.app import create_app

    app = create_app(settings)  # the lifespan builds the engine from the settings, on the cached graph
    with serve(app) as url, httpx.Client(base_url=url, timeout=120) as client:
        if runner == "thread":  # in this process: the engine is at hand, and a spy sees every session made
            engine = app.state.service.runner.engine
            assert engine.name == "onnxruntime" and not engine.graph.built
            monkeypatch.setattr(ort.InferenceSession, "__init__", counting_init)
        for seed, task in ((41, "fresh"), (42, "fresh"), (43, "other")):  # a new task, its new version, another
            bias_set = random_bias_set(backbone, task, pooling="pooler", seed=seed)
            r = client.put(f"/tasks/{task}", content=bias_set.to_bytes(), headers=ADMIN)
            assert r.status_code == 201, r.text
            body = client.post("/predict", params={"task": task}, json={"inputs": TEXTS[:3]}).json()
            assert body["version"] == r.json()["version"]  # live at once
            got = torch.tensor([[p["scores"][lab] for lab in bias_set.labels] for p in body["predictions"]]).log()
            want = torch.stack(alone(backbone, bias_set, TEXTS[:3])).log_softmax(-1)
            torch.testing.assert_close(got, want, **FP32)
        shipped = client.post("/predict", params={"task": "sst2"}, json={"inputs": ["a fine film"]})
        assert shipped.status_code == 200, shipped.text
    assert sessions == []  # no session made for an upload or a request
    assert (graph.stat().st_mtime_ns, graph.stat().st_size, onnx_export.file_digest(graph)) == before


# -- the cache, on a tiny BERT (same code path, a second per export) -------------------------------------------


@pytest.fixture(scope="module")
def tiny(minilm_dir):
    """A 2-layer BERT with MiniLM's tokenizer (random weights, deterministic; the real model is not loaded)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=37, max_position_embeddings=128)
    return finish_backbone(BertModel(config).eval(), tokenizer, "tiny-bert")


def tiny_answers(tiny, cache):
    """An engine on the cached tiny graph, and its outputs against the torch engine's for two tasks."""
    sets = [random_bias_set(tiny, "a", seed=1), random_bias_set(tiny, "b", ["x", "y", "z"], pooling="pooler", seed=2)]
    ort, tch = OrtEngine(tiny, cache_dir=cache, threads=1), fresh_engine(copy.deepcopy(tiny))
    for s in sets:
        ort.bank.load(s.task, s)
        tch.bank.load(s.task, s)
    got, want = both(ort, tch, [TEXTS[0], PAIRS[0], TEXTS[1]], [0, 1, 0])
    torch.testing.assert_close(got.logits, want.logits, **FP32)
    return ort


def test_the_export_is_cached_and_a_second_engine_reuses_it(tiny, tmp_path):
    first = tiny_answers(tiny, tmp_path)
    path, sidecar = entry_paths(tmp_path, tiny.layout.fingerprint, "fp32")
    assert first.graph.built and first.graph.path == path and sidecar.is_file()
    stamp = path.stat().st_mtime_ns
    second = tiny_answers(tiny, tmp_path)
    assert not second.graph.built and path.stat().st_mtime_ns == stamp
    meta = json.loads(sidecar.read_text())
    assert meta["fingerprint"] == tiny.layout.fingerprint and meta["sha256"] == onnx_export.file_digest(path)
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temporary file left


def truncate(path, sidecar):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garbage(path, sidecar):
    path.write_bytes(os.urandom(path.stat().st_size))  # same size: only the hash can tell


def foreign(path, sidecar):
    meta = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps(meta | {"fingerprint": "f" * 64}))


def stale_format(path, sidecar):
    meta = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps(meta | {"format": onnx_export.FORMAT - 1}))


def stale_torch(path, sidecar):
    meta = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps(meta | {"torch": "1.0.0"}))


def no_sidecar(path, sidecar):
    sidecar.unlink()  # an export interrupted after the rename, before its commit mark


def bad_sidecar(path, sidecar):
    sidecar.write_text("{not json")




@pytest.mark.parametrize(
    "damage",
    [truncate, garbage, foreign, stale_format, stale_torch, no_sidecar, bad_sidecar],
    ids=["truncated file", "garbage of the same size", "foreign fingerprint", "older export format",
         "exported by another torch", "sidecar missing", "sidecar not JSON"],
)
def test_a_damaged_foreign_or_stale_cache_entry_is_rebuilt(tiny, tmp_path, damage):
    tiny_answers(tiny, tmp_path)
    path, sidecar = entry_paths(tmp_path, tiny.layout.fingerprint, "fp32")
    damage(path, sidecar)
    rebuilt = tiny_answers(tiny, tmp_path)  # equal to the torch engine again
    assert rebuilt.graph.built
    assert json.loads(sidecar.read_text())["sha256"] == onnx_export.file_digest(path)


def test_a_graph_whose_inputs_are_not_the_backbone_s_is_refused_with_what_to_do(tiny, tmp_path):
    tiny_answers(tiny, tmp_path)
    path, sidecar = entry_paths(tmp_path, tiny.layout.fingerprint, "fp32")
    # a valid graph without the bias input (the plain export), recorded in a sidecar that matches its bytes:
    # it passes the cache's hash check, and the engine's check of the graph's inputs catches it
    meta = json.loads(sidecar.read_text())
    onnx_export.export_graph(tiny, path, plain=True)
    sidecar.write_text(json.dumps(meta | {"bytes": path.stat().st_size, "sha256": onnx_export.file_digest(path)}))
    with pytest.raises(ExportFailed, match="delete it to rebuild"):
        OrtEngine(tiny, cache_dir=tmp_path)


def test_an_architecture_that_does_not_export_gets_a_clear_message(tiny, tmp_path, monkeypatch):
    def exporter_fails(*args, **kwargs):  # fault injection: the exporter meets an operator it cannot translate
        raise RuntimeError("Exporting the operator 'aten::made_up' to ONNX opset version 17 is not supported")

    monkeypatch.setattr(onnx_export.torch.onnx, "export", exporter_fails)
    with pytest.raises(ExportFailed, match=r"cannot export this backbone \(bert\).*--backend torch"):
        OrtEngine(tiny, cache_dir=tmp_path)
    assert not list(tmp_path.glob("*.onnx")) and not list(tmp_path.glob("*.json"))  # nothing half-written cached


def test_a_graph_that_disagrees_with_the_model_is_refused_and_not_cached(tiny, tmp_path, monkeypatch):
    real = onnx_export.torch_export

    def wrong_graph(module, args, path, inputs, outputs):  # fault injection: a graph of other weights
        other = copy.deepcopy(module)
        with torch.no_grad():
            next(other.parameters()).mul_(1.5)
        real(other, args, path, inputs, outputs)

    monkeypatch.setattr(onnx_export, "torch_export", wrong_graph)
    with pytest.raises(ExportFailed, match="disagrees with the model"):
        ensure_graph(tiny, "fp32", tmp_path)
    assert not list(tmp_path.glob("*.onnx")) and not list(tmp_path.glob("*.json"))


def test_an_unwritable_cache_says_which_setting_to_change(tiny, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ExportFailed, match="BITFIT_ONNX_CACHE"):
        ensure_graph(tiny, "fp32", blocker / "cache")


# -- settings and command line ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (dict(backend="tensorrt"), "not one of torch, onnxruntime"),
        (dict(quantize="int8"), "quantize int8 needs --backend onnxruntime"),
        (dict(backend="onnxruntime", quantize="int4"), "quantize 'int4' is not one of none, int8"),
        (dict(backend="onnxruntime", device="cuda"), "CPU only"),
        (dict(backend="onnxruntime", dtype="bfloat16"), "float32 graphs"),
        (dict(backend="onnxruntime", compile=True), "compile is a torch backend option"),
        (dict(ort_threads=2), "ort_threads is an onnxruntime option"),
    ],
    ids=["unknown backend", "int8 on torch", "unknown quantisation", "onnxruntime on a GPU", "bfloat16 graph",
         "torch.compile on onnxruntime", "ort threads on torch"],
)
def test_settings_refuse_what_the_backend_cannot_honour(given, message):
    with pytest.raises(ValueError, match=message):
        Settings(**given)


def test_settings_accept_the_onnxruntime_backend_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("BITFIT_BACKEND", "onnxruntime")
    monkeypatch.setenv("BITFIT_QUANTIZE", "int8")
    monkeypatch.setenv("BITFIT_ORT_THREADS", "1")
    monkeypatch.setenv("BITFIT_ONNX_CACHE", str(tmp_path))
    s = Settings()
    assert (s.backend, s.quantize, s.ort_threads, s.onnx_cache) == ("onnxruntime", "int8", 1, tmp_path)


def test_serve_flags_reach_the_settings():
    from bitfit_cli.main import _load_extensions, build_parser

    _load_extensions()
    args = build_parser().parse_args(["serve", "--backend", "onnxruntime", "--quantize", "int8", "--ort-threads", "2",
                                      "--onnx-cache", "/tmp/x"])
    assert (args.backend, args.quantize, args.ort_threads, args.onnx_cache) == ("onnxruntime", "int8", 2, "/tmp/x")
