"""The audit log: every admin change (token name, action, task, version, time, client address) stored in the
store, read back over HTTP, and still there after a restart, on a directory and on a real S3 server."""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager

import httpx
import pytest

from server.http.app import create_app
from server.http.auth import hash_secret
from server.settings import Settings
from server.testing import fresh_engine, minilm, random_bias_set, serve

SECRETS = {"teama": "s-teama", "root": "s-root", "reader": "s-reader", "ci": "s-ci"}
SCOPES = {"teama": ["admin:teama-*"], "root": ["admin:*"], "reader": ["read"], "ci": ["predict"]}
LEGACY = "s-legacy"

pytestmark = pytest.mark.slow


def bearer(who: str) -> dict:
    return {"Authorization": f"Bearer {LEGACY if who == 'legacy' else SECRETS[who]}"}


@pytest.fixture
def tokens_file(tmp_path):
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps([{"name": n, "sha256": hash_secret(s), "scopes": SCOPES[n]} for n, s in SECRETS.items()]))
    return path


@contextmanager
def server(store, tokens_file):
    settings = Settings(store=store, tokens_file=tokens_file, admin_token=LEGACY, seed=False, max_wait_ms=5,
                        poll_interval_s=0.1)
    app = create_app(settings, fresh_engine())
    with serve(app) as url, httpx.Client(base_url=url, timeout=120) as client:
        client.app = app
        yield client


def changes(api) -> list[tuple]:
    """Make one change of each kind; returns what the log should say, oldest first."""
    backbone = minilm()
    v1 = api.put("/tasks/teama-x", content=random_bias_set(backbone, "teama-x", seed=1).to_bytes(), headers=bearer("teama"))
    v2 = api.put("/tasks/teama-x", params={"activate": "false"}, headers=bearer("root"),
                 content=random_bias_set(backbone, "teama-x", seed=2).to_bytes())
    assert v1.status_code == v2.status_code == 201
    v1, v2 = v1.json()["version"], v2.json()["version"]
    assert api.post("/tasks/teama-x/activate", json={"version": v2}, headers=bearer("teama")).status_code == 200
    assert api.post("/tasks/teama-x/rollback", headers=bearer("legacy")).status_code == 200
    assert api.delete(f"/tasks/teama-x/versions/{v2}", headers=bearer("teama")).status_code == 200
    other = api.put("/tasks/teamb-y", content=random_bias_set(backbone, "teamb-y", seed=3).to_bytes(),
                    headers=bearer("root")).json()["version"]
    assert api.delete("/tasks/teamb-y", headers=bearer("root")).status_code == 200
    return [("teama", "upload", "teama-x", v1), ("root", "upload", "teama-x", v2), ("teama", "activate", "teama-x", v2),
            ("BITFIT_ADMIN_TOKEN", "rollback", "teama-x", v1), ("teama", "delete_version", "teama-x", v2),
            ("root", "upload", "teamb-y", other), ("root", "delete_task", "teamb-y", None)]


def log_of(api, **params) -> list[dict]:
    r = api.get("/audit", params=params, headers=bearer("reader"))
    assert r.status_code == 200, r.text
    return r.json()["records"]


@pytest.mark.parametrize("backend", ["directory", "s3"])
def test_every_admin_change_is_in_the_audit_log_after_a_restart(backend, tmp_path, tokens_file, request):
    store = tmp_path / "store" if backend == "directory" else request.getfixturevalue("s3_env").location
    with server(store, tokens_file) as api:
        want = changes(api)
        first = log_of(api)
    assert [(r["token"], r["action"], r["task"], r["version"]) for r in reversed(first)] == want  # newest first
    assert all(r["client"] == "127.0.0.1" and r["time"].endswith(("Z", "+00:00")) for r in first)
    assert [r["activated"] for r in reversed(first) if r["action"] == "upload"] == [True, False, True]
    assert [r["time"] for r in first] == sorted((r["time"] for r in first), reverse=True)
    with server(store, tokens_file) as again:  # a new process on the same store: the log is durable
        assert log_of(again) == first
        assert log_of(again, task="teamb-y") == [r for r in first if r["task"] == "teamb-y"]
        assert log_of(again, limit=2) == first[:2]


def test_refused_and_failed_changes_are_not_logged_and_reading_needs_scope_read(tmp_path, tokens_file):
    with server(tmp_path / "store", tokens_file) as api:
        good = random_bias_set(minilm(), "teamb-z", seed=4).to_bytes()
        assert api.put("/tasks/teamb-z", content=good, headers=bearer("teama")).status_code == 403  # outside scope
        assert api.put("/tasks/teamb-z", content=b"not a bias set", headers=bearer("root")).status_code == 422
        assert log_of(api) == []
        assert api.get("/audit").status_code == 401
        r = api.get("/audit", headers=bearer("ci"))
        assert r.status_code == 403 and "'read'" in r.json()["detail"]
        assert api.get("/audit", headers=bearer("teama")).status_code == 200  # admin scopes read
        assert api.get("/audit", params={"limit": 0}, headers=bearer("reader")).status_code == 422
        assert api.get("/audit", params={"task": "Bad.Name"}, headers=bearer("reader")).status_code == 422


def test_a_change_whose_record_cannot_be_stored_is_still_made_logged_and_counted(tmp_path, tokens_file, caplog,
                                                                                 monkeypatch):
    with server(tmp_path / "store", tokens_file) as api:
        def refuse(record):
            raise OSError("disk full (injected)")

        monkeypatch.setattr(api.app.state.service.store, "append_audit", refuse)
        with caplog.at_level(logging.ERROR, logger="server.service"):
            r = api.put("/tasks/teama-q", content=random_bias_set(minilm(), "teama-q", seed=5).to_bytes(),
                        headers=bearer("teama"))
        assert r.status_code == 201 and api.get("/tasks/teama-q", headers=bearer("reader")).status_code == 200
        assert "bitfit_audit_write_errors_total 1.0" in api.get("/metrics").text
        assert any("could not be stored" in rec.getMessage() and "teama-q" in rec.getMessage() for rec in caplog.records)


def test_no_tokens_configured_means_the_audit_log_is_refused_with_how_to_set_one(tmp_path):
    app = create_app(Settings(store=tmp_path / "store", seed=False, max_wait_ms=5), fresh_engine())
    with serve(app) as url:
        r = httpx.get(f"{url}/audit", timeout=60)
    assert r.status_code == 403 and "BITFIT_TOKENS_FILE" in r.json()["detail"]
