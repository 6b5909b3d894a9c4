"""`bitfit serve` as a real separate process, and the admin commands (push, list, activate, rollback, delete,
predict) against it; a second server in this process shares its store, as a second replica would."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from bitfit_cli.main import main
from server.http.app import create_app
from server.client import BitfitClient, ClientError
from server.settings import Settings
from server.testing import fresh_engine, minilm, random_bias_set, serve

TOKEN = "cli-token"
SEED_DIR = Path(os.environ.get("BITFIT_SEED_DIR") or Path(__file__).resolve().parents[1] / "server" / "seed")
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cli-store")


@pytest.fixture(scope="module")
def server(store_dir, tmp_path_factory):
    """`bitfit serve` in a subprocess; yields its URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("log") / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BITFIT_") or k == "BITFIT_SEED_DIR"}
    cmd = [sys.executable, "-m", "bitfit_cli", "serve", "--store", str(store_dir), "--port", str(port),
           "--token", TOKEN, "--threads", "1"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    try:
        while True:
            assert proc.poll() is None, f"bitfit serve exited: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"bitfit serve not ready: {log.read_text()[-2000:]}"
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture(scope="module")
def replica(server, store_dir):
    app = create_app(Settings(store=store_dir, seed=False, admin_token=TOKEN, poll_interval_s=0.1), fresh_engine())
    with serve(app) as url:
        yield url


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("sets")
    out = {}
    for i in range(2):
        path = d / f"clitask-{i}.safetensors"
        path.write_bytes(random_bias_set(minilm(), "clitask", seed=100 + i).to_bytes())
        out[i] = path
    return out


def bitfit(*argv, capsys):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_serve_defaults_are_loopback_port_8000_and_store_dir(monkeypatch):
    for key in [k for k in os.environ if k.startswith("BITFIT_")]:
        monkeypatch.delenv(key)
    s = Settings()
    assert (s.host, s.port, s.store, s.device, s.dtype, s.seed) == ("127.0.0.1", 8000, "store", "cpu",
                                                                     "float32", True)
    monkeypatch.setenv("BITFIT_STORE", "/tmp/elsewhere")
    assert Settings().store == "/tmp/elsewhere"
    monkeypatch.setenv("BITFIT_STORE", "s3://bucket/prefix/")
    assert Settings().store == "s3://bucket/prefix/"
    assert Settings(store=Path("/tmp/p")).store == "/tmp/p"


def test_settings_refuse_bad_combinations_naming_each():
    with pytest.raises(ValueError) as e:
        Settings(dtype="float16", device="cpu", max_inputs=10, max_queued=5)
    assert "float16" in str(e.value) and "max_inputs" in str(e.value)


def test_served_store_was_seeded_with_the_shipped_tasks(server):
    names = {t["name"] for t in BitfitClient(server).tasks()}
    assert {p.stem for p in SEED_DIR.glob("*.safetensors")} <= names


def test_push_list_activate_rollback_delete(server, files, capsys):
    code, out, _ = bitfit("push", files[0], "--task", "clitask", "--url", server, "--token", TOKEN, capsys=capsys)
    assert code == 0 and "clitask version" in out
    v0 = out.split()[2]
    code, out, _ = bitfit("push", files[1], "--task", "clitask", "--url", server, "--token", TOKEN, capsys=capsys)
    v1 = out.split()[2]
    code, out, _ = bitfit("list", "clitask", "--url", server, capsys=capsys)
    assert code == 0 and f"active={v1}" in out and v0 in out
    code, out, _ = bitfit("predict", "a fine film", "--task", "clitask", "--url", server, capsys=capsys)
    assert code == 0 and f'"version": "{v1}"' in out
    code, out, _ = bitfit("rollback", "clitask", "--url", server, "--token", TOKEN, capsys=capsys)
    assert code == 0 and v0 in out
    assert BitfitClient(server).predict("clitask", ["x"])["version"] == v0
    code, out, _ = bitfit("activate", "clitask", v1, "--url", server, "--token", TOKEN, capsys=capsys)
    assert code == 0 and BitfitClient(server).task("clitask")["active"] == v1
    code, _, _ = bitfit("delete", "clitask", "--version", v0, "--url", server, "--token", TOKEN, capsys=capsys)
    assert code == 0 and [v["version"] for v in BitfitClient(server).task("clitask")["versions"]] == [v1]
    code, _, _ = bitfit("delete", "clitask", "--url", server, "--token", TOKEN, capsys=capsys)
    assert code == 0 and "clitask" not in {t["name"] for t in BitfitClient(server).tasks()}


@pytest.mark.parametrize(("token", "needle"), [(None, "401"), ("wrong", "401")], ids=["no token", "wrong token"])
def test_push_refused_without_the_right_token_exits_2(server, files, capsys, monkeypatch, token, needle):
    monkeypatch.delenv("BITFIT_ADMIN_TOKEN", raising=False)
    argv = ["push", files[0], "--task", "clitask", "--url", server] + (["--token", token] if token else [])
    code, _, err = bitfit(*argv, capsys=capsys)
    assert code == 2 and needle in err and "Bearer" in err


def test_client_says_when_no_server_is_listening(capsys):
    code, _, err = bitfit("list", "--url", f"http://127.0.0.1:{free_port()}", capsys=capsys)
    assert code == 2 and "is `bitfit serve` running" in err


def test_client_library_raises_client_error_with_status_and_detail(server):
    with pytest.raises(ClientError) as e:
        BitfitClient(server).predict("no-such-task", ["x"])
    assert e.value.status == 404 and "GET /tasks" in e.value.detail


@pytest.mark.parametrize("direction", ["process to replica", "replica to process"], ids=str)
def test_upload_through_one_process_reaches_the_other_within_a_second(server, replica, direction):
    source, target = (server, replica) if direction == "process to replica" else (replica, server)
    seed = 200 if direction == "process to replica" else 300
    version = BitfitClient(source, TOKEN).push("shared", random_bias_set(minilm(), "shared", seed=seed).to_bytes())[
        "version"]
    start, client = time.monotonic(), BitfitClient(target)
    while True:
        try:
            if client.predict("shared", ["x"])["version"] == version:
                break
        except ClientError as e:
            assert e.status == 404, e
        assert time.monotonic() - start < 1.0, f"{target} did not pick up version {version} within a second"
        time.sleep(0.05)


def test_client_commands_start_without_importing_torch():
    code = ("import sys; from bitfit_cli.main import main\n"
            "try:\n    main(['list', '--url', 'http://127.0.0.1:9'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "False False", out.stdout + out.stderr
    assert "cannot reach http://127.0.0.1:9" in out.stderr
