"""The OpenAPI document is the exact contract: its error bodies, patterns, limits and security are what the server
does, and schemathesis (`--checks all`, against a real uvicorn server with a token) finds nothing."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from server.http.app import create_app
from server.settings import Settings
from server.testing import fresh_engine, serve

REPO = Path(__file__).resolve().parents[1]
SECRET = "contract-token"
LIMITS = dict(max_inputs=16, max_text_chars=500, max_body_bytes=256 << 10, max_upload_bytes=256 << 10, max_wait_ms=2,
              poll_interval_s=0.1)


def tokens(tmp_path) -> Path:
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps([{"name": "contract", "sha256": hashlib.sha256(SECRET.encode()).hexdigest(),
                                 "scopes": ["predict", "read", "admin:*"]}]))
    return path


@pytest.fixture(scope="module")
def document(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("doc")
    app = create_app(Settings(store=tmp / "store", tokens_file=tokens(tmp), predict_auth=True, **LIMITS))
    return app.openapi()


def operations(document):
    for path, ops in document["paths"].items():
        for method, op in ops.items():
            yield path, method, op


def test_every_error_is_documented_with_the_body_the_server_sends(document):
    assert "HTTPValidationError" not in json.dumps(document)  # FastAPI's default 422 (`detail` an array) is gone
    for path, method, op in operations(document):
        for status, response in op["responses"].items():
            if status.startswith(("4", "5")):
                ref = response["content"]["application/json"]["schema"]["$ref"]
                assert ref.endswith("/V2Error" if path.startswith("/v2") else "/ErrorOut"), (method, path, status)
    assert document["components"]["schemas"]["V2Error"]["required"] == ["error"]


def test_task_names_versions_and_inputs_carry_the_servers_rules(document):
    from bias_store.names import TASK_RE

    for path, method, op in operations(document):
        for p in op.get("parameters", []):
            schema = p["schema"]
            if p["name"] == "task":
                schema = schema.get("items", schema)
                schema = next((s for s in schema.get("anyOf", [schema]) if s.get("type") == "string"), schema)
                assert schema["pattern"] == f"^{TASK_RE.pattern}$", (method, path)
            if p["name"] == "version":
                schema = next((s for s in schema.get("anyOf", [schema]) if s.get("type") == "string"), schema)
                assert schema["pattern"] == "^[0-9a-f]{16}$", (method, path)
    inputs = document["components"]["schemas"]["PredictRequest"]["properties"]["inputs"]
    assert [(b["minItems"], b["maxItems"]) for b in inputs["anyOf"]] == [(1, 16), (1, 16)]
    assert inputs["anyOf"][0]["items"] == {"type": "string", "maxLength": 500}
    data = document["components"]["schemas"]["InferInput"]["properties"]["data"]
    assert [b.get("maxItems") for b in data["anyOf"] if b.get("type") == "array"] == [16, 16]


def test_security_is_on_exactly_the_operations_that_need_a_token(tmp_path, document):
    secured = {(m, p) for p, m, op in operations(document) if "security" in op}
    open_ones = {("get", p) for p in ("/healthz", "/readyz", "/metrics", "/v2", "/v2/health/live", "/v2/health/ready")}
    assert secured == {(m, p) for p, m, _ in operations(document)} - open_ones
    # without a tokens file only admin calls and the audit log need one
    plain = create_app(Settings(store=tmp_path / "store", admin_token="t")).openapi()
    assert {(m, p) for p, m, op in operations(plain) if "security" in op} == {
        ("put", "/tasks/{task}"), ("delete", "/tasks/{task}"), ("post", "/tasks/{task}/activate"),
        ("post", "/tasks/{task}/rollback"), ("delete", "/tasks/{task}/versions/{version}"), ("get", "/audit")}


@pytest.mark.slow
def test_schemathesis_finds_nothing(tmp_path):
    """`schemathesis run --checks all` with every phase, bounded in examples; seconds: see docs/platform.md.

    BITFIT_SCHEMATHESIS_EXAMPLES / _SEED widen or vary the search (a nightly run, or by hand)."""
    st = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or shutil.which("schemathesis")
    assert st, "schemathesis is not installed (make install installs it with the test extra)"
    settings = Settings(store=tmp_path / "store", tokens_file=tokens(tmp_path), predict_auth=True, **LIMITS)
    app = create_app(settings, fresh_engine())
    with serve(app) as url:
        start = time.monotonic()
        cmd = [st, "--config-file", str(REPO / "schemathesis.toml"), "run", f"{url}/openapi.json", "--checks", "all",
               "-H", f"Authorization: Bearer {SECRET}",
               "--max-examples", os.environ.get("BITFIT_SCHEMATHESIS_EXAMPLES", "10"),
               "--seed", os.environ.get("BITFIT_SCHEMATHESIS_SEED", "1"), "--workers", "1", "--no-color",
               "--request-timeout", "60", "--generation-database", "none"]
        out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)  # its caches go there
        seconds = time.monotonic() - start
        # every operation was tested and the run still answers afterwards (nothing broke the server)
        assert httpx.get(f"{url}/readyz", timeout=30).status_code == 200
    report = out.stdout + out.stderr
    assert out.returncode == 0, report[-6000:]
    assert "schemathesis.toml" in report, report[:2000]  # the operations' stated exceptions were in force
    tested = re.search(r"Tested: (\d+)", report)
    assert tested and int(tested.group(1)) == sum(len(ops) for ops in app.openapi()["paths"].values()), report[-3000:]
    assert re.search(r"\d+ generated, \d+ passed", report), report[-3000:]
    print(f"schemathesis: {seconds:.0f} s; " + report.strip().splitlines()[-1])
