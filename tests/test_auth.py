"""Scoped tokens: every scope refused and allowed over real HTTP, the file re-read when it changes (a removed token
stops working within seconds), a malformed file refused at start and survived on reload."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from server.http.app import create_app
from server.http.auth import LEGACY_NAME, TokenFileError, TokenRegistry, hash_secret, parse_tokens, token_problems
from server.settings import Settings
from server.testing import fresh_engine, minilm, random_bias_set, serve

REPO = Path(__file__).resolve().parents[1]
SECRETS = {"ci": "s-ci", "reader": "s-reader", "teama": "s-teama", "root": "s-root"}
SCOPES = {"ci": ["predict"], "reader": ["read"], "teama": ["admin:teama-*"], "root": ["admin:*"]}
LEGACY = "s-legacy"
ENTRIES = [{"name": n, "sha256": hash_secret(SECRETS[n]), "scopes": SCOPES[n]} for n in SECRETS]


def bearer(secret: str | None) -> dict:
    return {"Authorization": f"Bearer {secret}"} if secret else {}


def write_tokens(path: Path, entries) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(entries))
    os.replace(tmp, path)  # atomic, as a deploy tool would write it


# -- the file: parsed, checked, compared in constant time (no server) ---------------------------------------------


BAD_FILES = [
    ("not JSON", "[{", "is not JSON"),
    ("not a list", '{"name": "a"}', "must hold a JSON list"),
    ("missing fields", '[{"name": "a"}]', "missing scopes, sha256"),
    ("unknown field", json.dumps([{"name": "a", "sha256": "a" * 64, "scopes": ["read"], "scope": "x"}]),
     "unknown field(s) scope"),
    ("the secret instead of its hash", json.dumps([{"name": "a", "sha256": "hunter2", "scopes": ["read"]}]),
     "sha256 must be 64 hex digits"),
    ("unknown scope", json.dumps([{"name": "a", "sha256": "a" * 64, "scopes": ["write"]}]), "unknown scope 'write'"),
    ("bad glob", json.dumps([{"name": "a", "sha256": "a" * 64, "scopes": ["admin:Team/A"]}]), "the glob after 'admin:'"),
    ("no scopes", json.dumps([{"name": "a", "sha256": "a" * 64, "scopes": []}]), "scopes must be a non-empty list"),
    ("name used twice", json.dumps([{"name": "a", "sha256": "a" * 64, "scopes": ["read"]},
                                    {"name": "a", "sha256": "b" * 64, "scopes": ["read"]}]), "used twice"),
    ("reserved name", json.dumps([{"name": LEGACY_NAME, "sha256": "a" * 64, "scopes": ["read"]}]), "reserved"),
]


@pytest.mark.parametrize(("text", "needle"), [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES])
def test_a_malformed_tokens_file_is_refused_with_what_to_fix(tmp_path, text, needle):
    path = tmp_path / "tokens.json"
    path.write_text(text)
    with pytest.raises(TokenFileError, match="tokens file") as e:
        TokenRegistry(path)
    assert needle in str(e.value)
    with pytest.raises(TokenFileError):
        create_app(Settings(store=tmp_path / "store", tokens_file=path))  # before anything loads


def test_every_problem_is_reported_at_once():
    problems = token_problems([{"name": "a", "sha256": "x", "scopes": ["nope"]}, 7])
    assert len(problems) == 3, problems


def test_a_token_is_found_by_its_secret_only():
    tokens = parse_tokens(json.dumps(ENTRIES))
    assert [t.name for t in tokens] == list(SECRETS)
    registry = TokenRegistry(None, LEGACY)
    assert registry.find(LEGACY).name == LEGACY_NAME and registry.find(LEGACY).scopes == {"admin:*"}
    assert registry.find(LEGACY + "x") is None and registry.find("") is None
    assert tokens[0].digest == hashlib.sha256(b"s-ci").digest()  # stored as the hash, never the secret


@pytest.mark.parametrize(("scopes", "scope", "task", "allowed"), [
    (["predict"], "predict", None, True), (["predict"], "read", None, False),
    (["read"], "read", None, True), (["read"], "predict", None, False), (["read"], "admin", "a", False),
    (["admin:teama-*"], "admin", "teama-x", True), (["admin:teama-*"], "admin", "teamb-x", False),
    (["admin:teama-*"], "read", None, True), (["admin:teama-*"], "predict", None, False),
    (["admin:*"], "admin", "anything", True), (["admin:sst?"], "admin", "sst2", True),
], ids=lambda v: str(v))
def test_scope_rules(scopes, scope, task, allowed):
    token = parse_tokens(json.dumps([{"name": "t", "sha256": "a" * 64, "scopes": scopes}]))[0]
    assert token.allows(scope, task) is allowed


@pytest.mark.parametrize("setting", ["predict_auth", "read_auth"])
def test_auth_switched_on_without_tokens_is_refused_at_start(tmp_path, setting):
    with pytest.raises(ValueError, match=f"{setting} needs .*BITFIT_TOKENS_FILE"):
        Settings(store=tmp_path, **{setting: True})


def test_reads_need_a_token_by_default_only_with_a_tokens_file(tmp_path):
    assert not Settings(store=tmp_path, admin_token="t").reads_need_token
    assert Settings(store=tmp_path, tokens_file=tmp_path / "t.json").reads_need_token
    assert not Settings(store=tmp_path, tokens_file=tmp_path / "t.json", read_auth=False).reads_need_token


def test_bitfit_serve_exits_non_zero_on_a_malformed_tokens_file_before_loading_the_backbone(tmp_path):
    bad = tmp_path / "tokens.json"
    bad.write_text('[{"name": "ci", "sha256": "hunter2", "scopes": ["predict"]}]')
    env = {k: v for k, v in os.environ.items() if not k.startswith("BITFIT_")}
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "bitfit_cli", "serve", "--store", str(tmp_path / "store"),
                          "--tokens-file", str(bad)], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "sha256 must be 64 hex digits" in out.stderr and "loading the backbone" not in out.stderr
    assert time.monotonic() - start < 60


def test_bitfit_token_prints_a_secret_and_its_file_line(capsys):
    from bitfit_cli.main import main

    assert main(["token", "ci", "--scope", "predict", "--scope", "read"]) == 0
    captured = capsys.readouterr()
    entry = json.loads(captured.out)
    secret = captured.err.split(": ")[-1].strip()
    assert entry == {"name": "ci", "sha256": hash_secret(secret), "scopes": ["predict", "read"]}
    assert parse_tokens(json.dumps([entry]))[0].name == "ci"
    assert main(["token", "x", "--scope", "write"]) == 2


# -- over HTTP ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokens") / "tokens.json"
    write_tokens(path, ENTRIES)
    return path


@pytest.fixture(scope="module")
def api(tmp_path_factory, tokens_file):
    settings = Settings(store=tmp_path_factory.mktemp("store"), tokens_file=tokens_file, admin_token=LEGACY,
                        predict_auth=True, tokens_reload_s=0.1, seed=False, max_wait_ms=5, poll_interval_s=0.1)
    app = create_app(settings, fresh_engine())
    with serve(app) as url, httpx.Client(base_url=url, timeout=120) as client:
        versions = {}
        for task, seed in (("teama-x", 1), ("teamb-x", 2)):
            r = client.put(f"/tasks/{task}", content=random_bias_set(minilm(), task, seed=seed).to_bytes(),
                           headers=bearer(SECRETS["root"]))
            assert r.status_code == 201, r.text
            versions[task] = r.json()["version"]
        client.versions = versions
        yield client


@pytest.fixture
def restore_tokens(tokens_file):
    yield
    write_tokens(tokens_file, ENTRIES)
    time.sleep(0.3)


V2_BODY = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["fine"]}]}
CALLS = {  # name: (scope, method, path, json)
    "predict": ("predict", "POST", "/predict?task=teama-x", {"inputs": ["fine"]}),
    "fanout": ("predict", "POST", "/fanout?task=teama-x&task=teamb-x", {"inputs": ["fine"]}),
    "V2 infer": ("predict", "POST", "/v2/models/teama-x/infer", V2_BODY),
    "list tasks": ("read", "GET", "/tasks", None),
    "get task": ("read", "GET", "/tasks/teamb-x", None),
    "V2 metadata": ("read", "GET", "/v2/models/teamb-x", None),
    "V2 model ready": ("read", "GET", "/v2/models/teamb-x/ready", None),
    "audit": ("read", "GET", "/audit", None),
    "activate teama": ("admin:teama", "POST", "/tasks/teama-x/activate", "teama-x"),
    "activate teamb": ("admin:teamb", "POST", "/tasks/teamb-x/activate", "teamb-x"),
}
ALLOWED = {"predict": {"ci"}, "read": {"reader", "teama", "root", "legacy"},
           "admin:teama": {"teama", "root", "legacy"}, "admin:teamb": {"root", "legacy"}}
NEEDED = {"predict": "'predict'", "read": "'read' (or any admin scope)",
          "admin:teama": "an 'admin:<glob>' matching 'teama-x'", "admin:teamb": "an 'admin:<glob>' matching 'teamb-x'"}
WHO = ["no token", "unknown token", "ci", "reader", "teama", "root", "legacy"]
CASES = [(call, who) for call in CALLS for who in WHO]


def secret_of(who: str) -> str | None:
    return {"no token": None, "unknown token": "s-nobody", "legacy": LEGACY}.get(who) or SECRETS.get(who)


@pytest.mark.parametrize(("call", "who"), CASES, ids=[f"{c} by {w}" for c, w in CASES])
def test_every_scope_is_refused_and_allowed(api, call, who):
    scope, method, path, body = CALLS[call]
    if isinstance(body, str):  # an activation of the version already active: allowed, it changes nothing
        body = {"version": api.versions[body]}
    r = api.request(method, path, json=body, headers=bearer(secret_of(who)))
    if who in ("no token", "unknown token"):
        assert r.status_code == 401, r.text
        assert r.headers["WWW-Authenticate"] == "Bearer"
    elif who in ALLOWED[scope]:
        assert r.status_code in (200, 201), r.text
    else:
        assert r.status_code == 403, r.text
        message = r.json().get("detail") or r.json()["error"]
        assert NEEDED[scope] in message and repr(who if who != "legacy" else LEGACY_NAME) in message, message


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/v2", "/v2/health/live", "/v2/health/ready",
                                  "/openapi.json", "/docs"], ids=str)
def test_probes_metrics_and_docs_need_no_token(api, path):
    assert api.get(path).status_code == 200


def test_requests_are_counted_per_token_in_metrics(api):
    api.post("/predict?task=teama-x", json={"inputs": ["fine"]}, headers=bearer(SECRETS["ci"]))
    api.get("/tasks", headers=bearer(SECRETS["ci"]))
    text = api.get("/metrics").text
    assert 'bitfit_token_requests_total{scope="predict",token="ci"}' in text
    assert 'bitfit_auth_refusals_total{status="403",token="ci"}' in text


def wait_for(api, secret, status, within: float = 5.0) -> float:
    """Seconds until GET /tasks with `secret` answers `status`."""
    start = time.monotonic()
    while True:
        r = api.get("/tasks", headers=bearer(secret))
        if r.status_code == status:
            return time.monotonic() - start
        assert time.monotonic() - start < within, f"still {r.status_code} after {within} s: {r.text}"
        time.sleep(0.05)


def test_a_token_added_works_and_a_token_removed_stops_within_seconds(api, tokens_file, restore_tokens):
    new = {"name": "newcomer", "sha256": hash_secret("s-new"), "scopes": ["read"]}
    assert api.get("/tasks", headers=bearer("s-new")).status_code == 401
    write_tokens(tokens_file, [*ENTRIES, new])
    assert wait_for(api, "s-new", 200) < 3
    write_tokens(tokens_file, [e for e in ENTRIES if e["name"] != "reader"] + [new])  # revoke reader
    assert wait_for(api, SECRETS["reader"], 401) < 3
    tokens_file.write_text(json.dumps(ENTRIES))  # an edit in place (no rename) is noticed as well
    assert wait_for(api, "s-new", 401) < 3 and wait_for(api, SECRETS["reader"], 200) < 3


def test_a_malformed_file_on_reload_keeps_the_old_tokens_and_logs_an_error(api, tokens_file, restore_tokens, caplog):
    errors_before = metric(api, "bitfit_tokens_file_errors_total")
    with caplog.at_level(logging.ERROR, logger="server.http.auth"):
        write_tokens(tokens_file, [{"name": "oops", "sha256": "not a hash", "scopes": ["read"]}])
        deadline = time.monotonic() + 5
        while metric(api, "bitfit_tokens_file_errors_total") == errors_before:  # the file is looked at on use
            assert api.get("/tasks", headers=bearer(SECRETS["reader"])).status_code == 200  # old tokens in force
            assert time.monotonic() < deadline, "the malformed file was not noticed"
            time.sleep(0.05)
    assert any("sha256 must be 64 hex digits" in r.getMessage() and "stay in force" in r.getMessage()
               for r in caplog.records)
    tokens_file.unlink()  # a vanished file is an error too: the tokens stay
    time.sleep(0.3)
    assert api.get("/tasks", headers=bearer(SECRETS["reader"])).status_code == 200
    write_tokens(tokens_file, [])  # the way to revoke every file token
    assert wait_for(api, SECRETS["reader"], 401) < 3
    assert api.get("/tasks", headers=bearer(LEGACY)).status_code == 200  # BITFIT_ADMIN_TOKEN is not in the file


def metric(api, name: str) -> float:
    for line in api.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0
