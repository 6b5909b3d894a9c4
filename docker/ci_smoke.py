"""HTTP half of docker/ci-check.sh: talks to the container through its published port and checks the answers.

    python docker/ci_smoke.py upload  --url URL --token T --seed FILE --task NAME --state FILE
    python docker/ci_smoke.py restart --url URL --state FILE

`upload`: the shipped sst2 task answers; an upload without the token is refused and stores nothing; the shipped
sst2 bias set re-saved under a new task name is accepted and answers exactly like sst2; a second version of it
(zero bias delta, so the backbone's own biases under sst2's head) goes live at once and answers differently.
`restart` (a new container on the same volume): both versions are still stored, the second is active and gives
the same scores as before. Needs bitfit importable (the project's venv) to re-save the bias set.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

TEXTS = ["a gripping, beautifully acted and deeply moving film", "a dull, lifeless and tediously predictable mess"]
# Same bias set, same backbone, same process kind: the scores agree to float32 rounding.
TOLERANCE = 1e-5
# A loopback request must never go through a proxy from the environment.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class CheckFailed(Exception):
    pass


def check(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def call(method: str, url: str, body: bytes | None = None, token: str | None = None,
         content_type: str = "application/json", show: bool = True) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, method=method)
    if body is not None:
        request.add_header("Content-Type", content_type)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with OPENER.open(request, timeout=60) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    try:
        payload = json.loads(raw) if raw else {}
    except ValueError:
        payload = {"raw": raw[:200].decode(errors="replace")}
    if show or status != 200:
        print(f"  {method} /{url.split('/', 3)[-1]} -> {status} {json.dumps(payload)[:300]}")
    return status, payload


def wait_ready(url: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with OPENER.open(f"{url}/readyz", timeout=5) as response:
                if response.status == 200:
                    print(f"  GET /readyz -> 200 {response.read().decode()}")
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        check(time.monotonic() < deadline, f"{url}/readyz did not answer 200 within {timeout_s:.0f} s")
        time.sleep(1)


def predict(url: str, task: str) -> tuple[str, list[dict]]:
    status, out = call("POST", f"{url}/predict?task={task}", json.dumps({"inputs": TEXTS}).encode(), show=False)
    check(status == 200, f"predict {task}: status {status}, {out}")
    check(out.get("task") == task and len(out.get("predictions", [])) == len(TEXTS), f"predict {task}: {out}")
    answers = "; ".join(f"{text[:24]!r}... {p['label']} {p['score']:.4f}" for text, p in zip(TEXTS, out["predictions"]))
    print(f"  POST /predict?task={task} -> 200 version {out['version']}: {answers}")
    return out["version"], out["predictions"]


def same_scores(a: list[dict], b: list[dict]) -> bool:
    return all(abs(x["scores"][k] - y["scores"][k]) <= TOLERANCE for x, y in zip(a, b) for k in x["scores"])


def resave(seed: Path, task: str, zero_delta: bool) -> bytes:
    """The shipped bias set under another task name (the file's task must match the upload's), optionally with a
    zero delta; a distinct created_at gives each file its own content, hence its own version."""
    from bitfit.bias_set import BiasSet

    original = BiasSet.from_bytes(seed.read_bytes())
    changed = dataclasses.replace(
        original, task=task, delta=original.delta * 0 if zero_delta else original.delta,
        created_at=f"2026-01-0{2 if zero_delta else 1}T00:00:00+00:00",
    )
    return changed.to_bytes()


def cmd_upload(args) -> None:
    url, task = args.url.rstrip("/"), args.task
    wait_ready(url)

    print("shipped task sst2 answers, and tells the two sentences apart:")
    _, sst2 = predict(url, "sst2")
    check(sst2[0]["label"] != sst2[1]["label"], f"sst2 gave one label to opposite sentences: {sst2}")

    first, second = resave(args.seed, task, zero_delta=False), resave(args.seed, task, zero_delta=True)
    print("an upload without the admin token is refused and stores nothing:")
    status, _ = call("PUT", f"{url}/tasks/{task}", first, content_type="application/octet-stream")
    check(status == 401, f"upload without a token: status {status}, expected 401")
    status, _ = call("GET", f"{url}/tasks/{task}")
    check(status == 404, f"task {task} exists after a refused upload (status {status})")

    print(f"sst2's bias set re-saved as task {task}: stored, live at once, answers exactly like sst2:")
    status, out = call("PUT", f"{url}/tasks/{task}", first, token=args.token, content_type="application/octet-stream")
    check(status == 201, f"upload: status {status}, {out}")
    v1 = out["version"]
    version, p1 = predict(url, task)
    check(version == v1, f"{task} answered with version {version}, expected the upload's {v1}")
    check(same_scores(p1, sst2), f"{task} (sst2's biases) scores differ from sst2's: {p1} vs {sst2}")

    print(f"a second version of {task} (zero bias delta): stored, live at once, answers differently:")
    status, out = call("PUT", f"{url}/tasks/{task}", second, token=args.token, content_type="application/octet-stream")
    check(status == 201, f"second upload: status {status}, {out}")
    v2 = out["version"]
    check(v2 != v1, f"second upload got the first one's version {v1}")
    version, p2 = predict(url, task)
    check(version == v2, f"{task} answered with version {version}, expected the new {v2}")
    check(not same_scores(p2, p1), f"zero-delta version scores like the trained one: {p2}")

    args.state.write_text(json.dumps({"task": task, "versions": [v1, v2], "active": v2, "predictions": p2}))


def cmd_restart(args) -> None:
    url = args.url.rstrip("/")
    state = json.loads(args.state.read_text())
    task = state["task"]
    wait_ready(url)
    print(f"after the restart, on the same volume: {task} keeps both versions, the second active, same answers:")
    status, out = call("GET", f"{url}/tasks/{task}")
    check(status == 200, f"GET /tasks/{task} after restart: status {status}")
    stored = {v["version"] for v in out["versions"]}
    check(set(state["versions"]) <= stored, f"versions {state['versions']} not all stored after restart: {stored}")
    check(out["active"] == state["active"], f"active version {out['active']}, expected {state['active']}")
    version, predictions = predict(url, task)
    check(version == state["active"], f"answered with {version}, expected {state['active']}")
    check(same_scores(predictions, state["predictions"]), f"scores changed across the restart: {predictions}")
    predict(url, "sst2")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("upload")
    p.add_argument("--url", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--seed", type=Path, required=True, help="a shipped bias set file of task sst2")
    p.add_argument("--task", required=True, help="new task name for the re-saved copy")
    p.add_argument("--state", type=Path, required=True, help="file the restart check reads")
    p.set_defaults(func=cmd_upload)
    p = sub.add_parser("restart")
    p.add_argument("--url", required=True)
    p.add_argument("--state", type=Path, required=True)
    p.set_defaults(func=cmd_restart)
    args = parser.parse_args()
    try:
        args.func(args)
    except CheckFailed as err:
        print(f"ci_smoke: FAILED: {err}", file=sys.stderr)
        return 1
    print(f"ci_smoke: {args.command} checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
