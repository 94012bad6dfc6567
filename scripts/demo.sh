#!/usr/bin/env bash
# `make demo`: the whole walk-through on this machine. Builds the demo model and adapters (cached),
# serves them, asks each adapter, promotes one to a merged AWQ engine under traffic, asks again,
# runs a short A/B load test, rolls back, prints a summary. Stops everything it started.
set -euo pipefail
export COLUMNS=${COLUMNS:-120}  # rich tables are readable in a log too
cd "$(dirname "$0")/.."
SY=.venv/bin/switchyard
PY=.venv/bin/python
CFG=artifacts/demo/switchyard.toml
ROUTE=${DEMO_ROUTE:-demo-reverse}
OUT=artifacts/demo-run
mkdir -p "$OUT"
t_start=$(date +%s)

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1. build the demo model and adapters (cached)"
$SY demo build

PORT=$($PY - <<'PY'
from switchyard.config import load_config
print(load_config("artifacts/demo/switchyard.toml").gateway.port)
PY
)
URL=http://127.0.0.1:$PORT

step "2. serve: base engine with both adapters, then the gateway on $URL (log: $OUT/serve.log)"
$SY serve --config $CFG >"$OUT/serve.log" 2>&1 &
SERVE_PID=$!
cleanup() {
  if kill -0 $SERVE_PID 2>/dev/null; then
    kill -TERM $SERVE_PID; wait $SERVE_PID 2>/dev/null || true
  fi
}
trap cleanup EXIT
for _ in $(seq 1 300); do
  if curl -fs "$URL/readyz" >/dev/null 2>&1; then break; fi
  kill -0 $SERVE_PID 2>/dev/null || { tail -n 30 "$OUT/serve.log"; echo "serve exited"; exit 1; }
  sleep 1
done
curl -fs "$URL/readyz" >/dev/null || { tail -n 30 "$OUT/serve.log"; echo "serve not ready"; exit 1; }
$SY status --config $CFG
if $SY status --config $CFG --json | $PY -c "import json,sys; r={x['name']:x['mode'] for x in json.load(sys.stdin)['routes']}; sys.exit(0 if r.get('$ROUTE')=='merged' else 1)"; then
  step "(a previous run left $ROUTE merged: rolling back first)"
  $SY rollback $ROUTE --config $CFG
fi

step "3. ask each adapter through the gateway (OpenAI client)"
$PY scripts/ask.py --config $CFG

step "4. promote $ROUTE: merge, quantize (AWQ where this vLLM can serve it), validate, start, hot-swap"
$SY promote $ROUTE --config $CFG --quantize auto

step "5. the same questions: $ROUTE now answers from the merged engine"
$PY scripts/ask.py --config $CFG

step "6. A/B load test, interleaved: demo-sort (adapter on the base engine) vs $ROUTE (merged engine)"
$SY loadtest --url "$URL" --model demo-sort --model $ROUTE --concurrency 1,4 --requests 16 \
  --max-tokens 16 --ignore-eos --warmup 2 --seed 0 --out "$OUT/loadtest" || echo "(load test failed; continuing)"

step "7. roll back $ROUTE to its adapter"
$SY rollback $ROUTE --config $CFG
$PY scripts/ask.py --config $CFG -n 1

step "8. summary"
$SY status --config $CFG
$SY history $ROUTE --config $CFG
echo
echo "demo finished in $(( $(date +%s) - t_start )) s; load-test report: $OUT/loadtest/report.md; serve log: $OUT/serve.log"
