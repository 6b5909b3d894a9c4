"""`bitfit serve` and the admin client commands (push, list, activate, rollback, delete, predict).

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

    from server.app import build_engine, create_app
    from server.bank import pin_mmap_threshold
    from server.settings import Settings

    given = {
        "store": args.store, "host": args.host, "port": args.port, "device": args.device, "dtype": args.dtype,
        "backbone": args.backbone, "admin_token": args.token, "threads": args.threads, "max_batch": args.max_batch,
        "max_wait_ms": args.max_wait_ms,
    }  # fmt: skip
    settings = Settings(**{k: v for k, v in given.items() if v is not None}, **({"seed": False} if args.no_seed else {}))
    pin_mmap_threshold()  # before the bank allocates anything
    print(f"bitfit serve: loading the backbone on {settings.device} ({settings.dtype}) ...", file=sys.stderr)
    engine = build_engine(settings)  # fail here, with a clear message, rather than inside uvicorn
    if settings.token() is None:
        print("bitfit serve: no admin token (BITFIT_ADMIN_TOKEN or --token): uploads and changes are refused",
              file=sys.stderr)
    print(f"bitfit serve: store {settings.store.resolve()}, API docs at http://{settings.host}:{settings.port}/docs",
          file=sys.stderr)
    uvicorn.run(create_app(settings, engine), host=settings.host, port=settings.port,
                log_level="info" if args.verbose else "warning")
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


def add_commands(sub) -> None:
    p = sub.add_parser("serve", help="serve every task of a store from one resident backbone (HTTP)")
    p.add_argument("--store", help="bias store directory (default: $BITFIT_STORE or ./store); seeded with the "
                   "shipped tasks it lacks")
    p.add_argument("--host", help="default 127.0.0.1")
    p.add_argument("--port", type=int, help="default 8000")
    p.add_argument("--device", help="cpu (default), cuda, cuda:N")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default float32")
    p.add_argument("--backbone", help="local Hugging Face model directory (default: the packaged all-MiniLM-L6-v2)")
    p.add_argument("--token", help="admin token (default: $BITFIT_ADMIN_TOKEN; unset: admin calls refused)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
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
