"""`bitfit serve` and the client commands (push, list, activate, rollback, delete, predict, audit), and `bitfit token`.

Loaded lazily by `bitfit_cli.main`; FastAPI, uvicorn and torch are imported only by the command that runs.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_client(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="server URL (default: $BITFIT_URL or http://127.0.0.1:8000)")
    p.add_argument("--token", help="admin token (default: $BITFIT_ADMIN_TOKEN)")


def client(args):
    from server.client import BitfitClient

    return BitfitClient(args.url, args.token)


def cmd_serve(args) -> int:
    import uvicorn

    from bias_store.errors import StoreError
    from server.http.app import create_app, open_configured_store, start_runner
    from server.http.auth import TokenFileError, TokenRegistry
    from server.settings import Settings

    given = {
        "store": args.store, "host": args.host, "port": args.port, "device": args.device, "dtype": args.dtype,
        "backbone": args.backbone, "admin_token": args.token, "threads": args.threads, "max_batch": args.max_batch,
        "max_wait_ms": args.max_wait_ms, "tokens_file": args.tokens_file,
        "predict_auth": True if args.predict_auth else None, "backend": args.backend, "quantize": args.quantize,
        "ort_threads": args.ort_threads, "onnx_cache": args.onnx_cache, "runner": args.runner,
    }  # fmt: skip
    settings = Settings(**{k: v for k, v in given.items() if v is not None}, **({"seed": False} if args.no_seed else {}))
    if settings.tokens_file is not None:  # a malformed tokens file stops the server before anything loads
        try:
            n = len(TokenRegistry(settings.tokens_file).tokens())
        except TokenFileError as e:
            print(f"bitfit serve: error: {e}", file=sys.stderr)
            return 2
        print(f"bitfit serve: {n} tokens from {settings.tokens_file} (re-read when it changes)", file=sys.stderr)
    backend = settings.backend + (f", {settings.quantize} weights" if settings.quantize != "none" else "")
    print(f"bitfit serve: loading the backbone on {settings.device} ({settings.dtype}, {backend}, in "
          f"{'its own process' if settings.runner == 'process' else 'this process'}) ...", file=sys.stderr)
    runner = start_runner(settings)  # fail here, with a clear message, rather than inside uvicorn
    try:  # an unreachable or misconfigured store (endpoint, bucket, credentials) stops the server before it starts
        store = open_configured_store(settings, runner.spec)
    except StoreError as e:
        runner.stop()
        print(f"bitfit serve: error: cannot open the store {settings.store!r}: {e}", file=sys.stderr)
        return 2
    if settings.token() is None and settings.tokens_file is None:
        print("bitfit serve: no admin token (BITFIT_ADMIN_TOKEN or --token): uploads and changes are refused",
              file=sys.stderr)
    print(f"bitfit serve: store {store.location}, API docs at http://{settings.host}:{settings.port}/docs",
          file=sys.stderr)
    uvicorn.run(create_app(settings, store=store, runner=runner), host=settings.host, port=settings.port,
                timeout_keep_alive=settings.keep_alive_s, log_level="info" if args.verbose else "warning")
    return 0


def cmd_push(args) -> int:
    with client(args) as c:
        out = c.push(args.task, args.file, activate=not args.no_activate)
    state = "active" if not args.no_activate else "stored, not active"
    print(f"{out['task']} version {out['version']} ({state})")
    return 0


def cmd_list(args) -> int:
    with client(args) as c:
        tasks = [c.task(args.task)] if args.task else c.tasks()
    if args.json:
        print(json.dumps(tasks, indent=2))
        return 0
    for t in tasks:
        print(f"{t['name']}  active={t['active']}")
        for v in t["versions"]:
            mark = "*" if v["active"] else " "
            labels = ",".join(v["labels"]) or "(regression)"
            metrics = " ".join(f"{k}={val:.4f}" for k, val in v["metrics"].items() if isinstance(val, (int, float)))
            print(f"  {mark} {v['version']}  {v['created_at']}  {labels}  {metrics}")
    return 0


def cmd_activate(args) -> int:
    with client(args) as c:
        out = c.activate(args.task, args.version)
    print(f"{out['task']} active version is now {out['version']}")
    return 0


def cmd_rollback(args) -> int:
    with client(args) as c:
        out = c.rollback(args.task)
    print(f"{out['task']} rolled back to version {out['version']}")
    return 0


def cmd_delete(args) -> int:
    with client(args) as c:
        c.delete(args.task, args.version, force=args.force)
    print(f"deleted {args.task}" + (f" version {args.version}" if args.version else " and all its versions"))
    return 0


def cmd_predict(args) -> int:
    inputs = [t.split(args.pair_sep, 1) if args.pair_sep and args.pair_sep in t else t for t in args.texts]
    with client(args) as c:
        print(json.dumps(c.predict(args.task, inputs, args.version), indent=2))
    return 0


def cmd_audit(args) -> int:
    with client(args) as c:
        records = c.audit(args.task, limit=args.limit)
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    for r in records:
        print(f"{r.get('time')}  {r.get('token') or '-'}@{r.get('client') or '-'}  {r.get('action')}  "
              f"{r.get('task')}  {r.get('version') or ''}".rstrip())
    return 0


def cmd_token(args) -> int:
    import secrets

    from server.http.auth import hash_secret, scope_problem

    problems = [p for s in args.scope if (p := scope_problem(s))]
    if problems:
        print("bitfit token: error: " + "; ".join(problems), file=sys.stderr)
        return 2
    secret = secrets.token_urlsafe(32)
    print(f"secret (give it to the client; it is not stored): {secret}", file=sys.stderr)
    print(json.dumps({"name": args.name, "sha256": hash_secret(secret), "scopes": args.scope}))
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("serve", help="serve every task of a store from one resident backbone (HTTP)")
    p.add_argument("--store", help="bias store: a directory or s3://BUCKET/PREFIX (default: $BITFIT_STORE or ./store); "
                   "seeded with the shipped tasks it lacks")
    p.add_argument("--host", help="default 127.0.0.1")
    p.add_argument("--port", type=int, help="default 8000")
    p.add_argument("--device", help="cpu (default), cuda, cuda:N")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default float32")
    p.add_argument("--backbone", help="local Hugging Face model directory (default: the packaged all-MiniLM-L6-v2)")
    p.add_argument("--token", help="admin token (default: $BITFIT_ADMIN_TOKEN; unset: admin calls refused)")
    p.add_argument("--tokens-file", help="JSON list of scoped tokens {name, sha256, scopes} (default: "
                   "$BITFIT_TOKENS_FILE); re-read when it changes")
    p.add_argument("--predict-auth", action="store_true", help="/predict, /fanout and V2 inference need a token "
                   "with scope predict (default: $BITFIT_PREDICT_AUTH or open)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--runner", choices=["process", "thread"],
                   help="run the engine in its own process (default) or on a thread of the server's")
    p.add_argument("--backend", choices=["torch", "onnxruntime"], help="engine: torch (default), or onnxruntime "
                   "(CPU; the backbone exported once and cached; docs/onnx.md)")
    p.add_argument("--quantize", choices=["none", "int8"], help="onnxruntime: int8 weights (faster, slightly "
                   "different outputs; opt-in, accuracy in docs/onnx.md)")
    p.add_argument("--ort-threads", type=int, help="onnxruntime intra-op threads (default: --threads, else one per core)")
    p.add_argument("--onnx-cache", help="directory of exported graphs (default: ~/.cache/bitfit-serve/onnx)")
    p.add_argument("--max-batch", type=int, help="inputs per forward pass (default 32)")
    p.add_argument("--max-wait-ms", type=float, help="how long a request waits to fill a batch (default 5)")
    p.add_argument("--no-seed", action="store_true", help="do not add the shipped bias sets to the store")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("push", help="upload a bias set to a running server")
    p.add_argument("file", help="bias set file (.safetensors)")
    p.add_argument("--task", required=True, help="task name to store it under (must match the file's task)")
    p.add_argument("--no-activate", action="store_true", help="store it without making it the active version")
    add_client(p)
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("list", help="list a server's tasks and versions")
    p.add_argument("task", nargs="?", help="only this task")
    p.add_argument("--json", action="store_true")
    add_client(p)
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("activate", help="make a stored version a task's active version")
    p.add_argument("task")
    p.add_argument("version")
    add_client(p)
    p.set_defaults(func=cmd_activate)

    p = sub.add_parser("rollback", help="make a task's previously active version active again")
    p.add_argument("task")
    add_client(p)
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("delete", help="delete a task, or one version of it")
    p.add_argument("task")
    p.add_argument("--version", help="delete only this version")
    p.add_argument("--force", action="store_true", help="also when --version is the active version")
    add_client(p)
    p.set_defaults(func=cmd_delete)

    p = sub.add_parser("predict", help="ask a running server for predictions")
    p.add_argument("texts", nargs="+", help="inputs; with --pair-sep, 'a<SEP>b' is a pair")
    p.add_argument("--task", required=True)
    p.add_argument("--version")
    p.add_argument("--pair-sep", help="separator that splits an input into a text pair, e.g. '|||'")
    add_client(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("audit", help="show a server's audit log of admin changes, newest first (scope read)")
    p.add_argument("task", nargs="?", help="only this task")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--json", action="store_true")
    add_client(p)
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("token", help="make a new token: prints its secret and the line for BITFIT_TOKENS_FILE")
    p.add_argument("name", help="the token's name, as the audit log and /metrics show it")
    p.add_argument("--scope", action="append", required=True, help="predict, read, admin:<glob> or admin:*; repeat")
    p.set_defaults(func=cmd_token)
