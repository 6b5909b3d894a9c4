#!/bin/bash
# `bitfit serve --backbone smollm2` with a store of its own: push the BitFit and head-only SST-2 bias sets that
# bench/llm_sst2.py wrote, refuse a MiniLM set (other fingerprint), and predict both tasks at once (one mixed batch).
#   bash bench/llm_serve_demo.sh [BITFIT_SET] [HEAD_SET]
set -euo pipefail
cd "$(dirname "$0")/.."
BITFIT_SET=${1:-bench/results/llm_sst2/sst2-smollm2-bitfit.safetensors}
HEAD_SET=${2:-bench/results/llm_sst2/sst2-smollm2-head.safetensors}
export BITFIT_ADMIN_TOKEN=demo-token
WORK=$(mktemp -d /tmp/llm-demo.XXXX); PORT=${PORT:-8765}; URL=http://127.0.0.1:$PORT
trap 'kill $PID 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"' EXIT
# the head-only set is stored under its own task name, so both can be served side by side
.venv/bin/python - "$HEAD_SET" "$WORK/sst2-head.safetensors" <<'PY'
import dataclasses, sys
from bitfit.bias_set import load_bias_set, save_bias_set
save_bias_set(dataclasses.replace(load_bias_set(sys.argv[1]), task="sst2-head"), sys.argv[2])
PY
T0=$(date +%s.%N)
.venv/bin/bitfit serve --backbone smollm2 --store "$WORK/store" --port "$PORT" --max-wait-ms 50 > "$WORK/serve.log" 2>&1 &
PID=$!
until curl -sf "$URL/readyz" >/dev/null; do sleep 1; kill -0 $PID || { cat "$WORK/serve.log"; exit 1; }; done
echo "ready after $(python3 -c "import time; print(round(time.time() - $T0, 1))") s"
.venv/bin/bitfit push "$BITFIT_SET" --task sst2 --url "$URL"
.venv/bin/bitfit push "$WORK/sst2-head.safetensors" --task sst2-head --url "$URL"
echo "a MiniLM bias set on this server:"
curl -s -X PUT "$URL/tasks/minilm-sst2" -H "Authorization: Bearer $BITFIT_ADMIN_TOKEN" --data-binary @server/seed/sst2.safetensors; echo
BODY='{"inputs": ["a gripping, beautifully acted film", "dull.", "not bad at all", "the worst two hours of my year"]}'
pids=()
for t in sst2 sst2-head; do
  curl -s -X POST "$URL/predict?task=$t" -H 'content-type: application/json' -d "$BODY" > "$WORK/$t.json" & pids+=($!)
done
wait "${pids[@]}"
for t in sst2 sst2-head; do
  python3 -c "import json; d=json.load(open('$WORK/$t.json')); print(d['task'], d['version'][:12], [(p['label'], round(p['score'], 3)) for p in d['predictions']])"
done
curl -s "$URL/metrics" | grep -E '^bitfit_batches_total' || true
