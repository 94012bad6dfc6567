#!/usr/bin/env bash
# The GPU comparison (issue 7), on the lent GPU machine, in the last of three back-to-back device
# calls (../shared/gpu/README.md: calls 1 and 2 store bundle chunks; call 3 installs vLLM, then):
#
#   bash loadtests/gpu/run.sh START_EPOCH LIMIT_S [modes|gateway-cost [PREVIOUS_CHECKOUT]]
#
# START_EPOCH/LIMIT_S: when the device call began and how long it may run; everything stops
# 25 s before that. `modes` (the default): adapter vs merged vs AWQ (loadtests/gpu/modes.py);
# `gateway-cost`: one engine straight and through the gateway (loadtests/gpu/gateway_cost.py), with
# the gateway of PREVIOUS_CHECKOUT beside it when given. Needs: vLLM in /tmp/site, /tmp/extras/*.whl (typer, rich, ... for the modules
# torch's venv lacks), and the checkpoints from gen_models.py in /tmp/g (made here if missing).
set -u
start=${1:-$(date +%s)} limit=${2:-560} run=${3:-modes} previous=${4:-}
cd "$(dirname "$0")/../.."
export COLUMNS=160 PYTHONPATH=/tmp/site:$PWD VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
PY=${PY:-/opt/torch/.venv/bin/python3}
OUT=${OUT:-/tmp/out}
for w in /tmp/extras/*.whl; do  # install a wheel only where its module is missing
  [ -e "$w" ] || continue
  mod=$(basename "$w" | cut -d- -f1 | tr 'A-Z' 'a-z'); mod=${mod/markdown_it_py/markdown_it}
  $PY -c "import $mod" 2>/dev/null || { echo "extra: $mod"; $PY -m pip install -q --no-index --no-deps --target /tmp/site "$w" 2>&1 | grep -v WARNING; }
done
[ -f /tmp/g/awq/config.json ] || $PY loadtests/gpu/gen_models.py /tmp/g
if [ "$run" = gateway-cost ]; then
  $PY -m loadtests.gpu.gateway_cost --model /tmp/g/base --out "$OUT/gateway-cost" --asgi \
    ${previous:+--previous "$previous"} --deadline $((start + limit - 25))
else
  $PY -m loadtests.gpu.modes --models /tmp/g --out "$OUT/modes" --deadline $((start + limit - 25))
fi
rc=$?
du -sh /tmp/g/* 2>/dev/null
exit $rc
