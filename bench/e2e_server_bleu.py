"""The shipped E2E bias set's test BLEU through the server, against `bitfit eval`'s on the same set.

    .venv/bin/python bench/e2e_server_bleu.py                 # all 630 test inputs (about 15 minutes on 2 cores)
    .venv/bin/python bench/e2e_server_bleu.py --max-test 40   # plumbing check

Starts `bitfit serve --backbone smollm2` (its seed: server/seed/smollm2/e2e.safetensors), sends every test meaning
representation to `POST /v1/completions` (model e2e, temperature 0, max_tokens 64 as `bitfit eval` uses) from
`--clients` concurrent clients, so the sequences of many requests share each decode step, and scores the answers
with the same sacrebleu settings. Compares the BLEU and each output with `bitfit eval`'s outputs
(bench/results/e2e/outputs/bitfit-greedy-all.json, written by bench/e2e_compare.py). Writes
bench/results/e2e/server_bleu.json and, for a whole run, the block between the e2e-server markers in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import shlex
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e_compare import DATA, REPO, RESULTS  # noqa: E402

BEGIN = "<!-- e2e-server:begin (written by bench/e2e_server_bleu.py from one run; edit outside these markers) -->"
END = "<!-- e2e-server:end -->"
EVAL_OUTPUTS = RESULTS / "outputs" / "bitfit-greedy-all.json"
MAX_TOKENS = 64


def complete(client: httpx.Client, source: str) -> str:
    r = client.post("/v1/completions", json={"model": "e2e", "prompt": source, "max_tokens": MAX_TOKENS,
                                             "temperature": 0})
    r.raise_for_status()
    return r.json()["choices"][0]["text"].strip()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-test", type=int, help="only the first N test inputs (a plumbing check; no BENCHMARKS.md)")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients (the server decodes 16 at once)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    import serving_http as sh
    from bitfit.bleu import corpus_bleu
    from bitfit.e2e import group_references, read_pairs

    grouped = group_references(read_pairs(DATA / "test.txt"))[: args.max_test]
    command = (".venv/bin/python bench/e2e_server_bleu.py " + shlex.join(sys.argv[1:] if argv is None else argv)).strip()
    tmp = Path(tempfile.mkdtemp(prefix="e2e-server-"))
    env = {"BITFIT_BACKBONE": "smollm2", "BITFIT_MAX_TOKENS": str(MAX_TOKENS)}
    start = time.perf_counter()
    with sh.bitfit_server(tmp / "store", tmp / "serve.log", threads=args.threads, seed=True, env_extra=env) as (url, proc):
        sh.wait_ready(url, proc, tmp / "serve.log", 1)
        with httpx.Client(base_url=url, timeout=600) as client, \
                concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
            t0 = time.perf_counter()
            futures = [pool.submit(complete, client, g.source) for g in grouped]
            outputs = [f.result() for f in tqdm(futures, desc="test inputs", unit="input")]
            generate_s = time.perf_counter() - t0
    score, signature = corpus_bleu(outputs, [g.references for g in grouped])
    result = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "command": command,
              "inputs": len(grouped), "clients": args.clients, "threads": args.threads, "bleu": score.score,
              "signature": signature, "generate_s": round(generate_s, 1),
              "wall_s": round(time.perf_counter() - start, 1), "outputs": outputs}
    if EVAL_OUTPUTS.is_file():
        ref = json.loads(EVAL_OUTPUTS.read_text())
        theirs = ref["outputs"][: len(outputs)]
        result["eval_bleu_same_inputs"] = corpus_bleu(theirs, [g.references for g in grouped])[0].score
        result["eval_bleu"] = ref["bleu"]
        result["identical_outputs"] = sum(a == b.strip() for a, b in zip(outputs, theirs))
        result["eval_source"] = ref.get("source")
    out = RESULTS / ("server_bleu.json" if args.max_test is None else "server_bleu_quick.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"Run {result['date']}: `{command}` ({result['wall_s'] / 60:.1f} min, generation "
             f"{generate_s / 60:.1f} min, {args.clients} concurrent clients, 1 server thread).", "",
             "| | test inputs | BLEU |", "|---|---:|---:|",
             f"| `POST /v1/completions` (server, continuous batching) | {len(outputs)} | **{score.score:.2f}** |"]
    if "eval_bleu_same_inputs" in result:
        lines += [f"| `bitfit eval` (fixed batches of 64) | {len(outputs)} | {result['eval_bleu_same_inputs']:.2f} |", "",
                  f"Outputs identical to `bitfit eval`'s: {result['identical_outputs']} of {len(outputs)}. "
                  f"BLEU: sacrebleu `{signature}`."]
    block = "\n".join(lines)
    print(block)
    if args.max_test is None:
        from serving_report import write_block

        write_block(REPO / "BENCHMARKS.md", block, BEGIN, END)
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
