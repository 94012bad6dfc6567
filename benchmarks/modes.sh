#!/usr/bin/env bash
# Adapter vs merged (vs merged AWQ where this vLLM can serve 4-bit) on the demo model, THROUGH the
# gateway, interleaved in one load test at concurrency 1, 4 and 16 (loadtests.compare_modes).
#
#   bash benchmarks/modes.sh [OUT_DIR]        # default artifacts/bench-modes; ~10 min on 2 cores
#
# Engines: the demo base with its adapters (adapter mode) and one engine per merged checkpoint, all
# started by deploy.engines; the gateway is `switchyard gateway` routing `demo-reverse` to the adapter
# and `demo-reverse-merged` (`-awq`) to the merged engines. Everything started here is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-artifacts/bench-modes}
PY=.venv/bin/python
SY=.venv/bin/switchyard
DEMO=artifacts/demo
mkdir -p "$OUT"
$SY demo build

$SY merge $DEMO/base $DEMO/adapters/reverse --out "$OUT/merged" --force
AWQ=0
if $PY -c "import sys; from merger.quantize import quantized_serving_problem as p; sys.exit(0 if p() is None else 1)"; then
  AWQ=1
  $SY quantize "$OUT/merged" --out "$OUT/merged-awq" --calibration $DEMO/train/reverse.jsonl --force
else
  echo "note: $($PY -c 'from merger.quantize import quantized_serving_problem as p; print(p())')"
fi

exec $PY - "$OUT" "$AWQ" <<'PY'
import subprocess, sys, time
from pathlib import Path
from deploy.engines import Engine, EngineLaunch, free_port, wait_ok
from switchyard.config import load_config

out, awq = Path(sys.argv[1]).resolve(), sys.argv[2] == "1"
cfg = load_config("artifacts/demo/switchyard.toml")
common = dict(max_model_len=cfg.engine.max_model_len, kv_cache_gib=cfg.engine.kv_cache_gib)
launches = {"base": EngineLaunch(cfg.base.model, cfg.base.name, free_port(), enable_lora=True,
                                 max_lora_rank=cfg.engine.max_lora_rank, max_loras=cfg.engine.max_loras,
                                 lora_modules=tuple((a.name, a.path) for a in cfg.adapters),
                                 log_path=out / "engine-base.log", **common),
            "merged": EngineLaunch(out / "merged", "demo-reverse-merged", free_port(),
                                   log_path=out / "engine-merged.log", **common)}
if awq:
    launches["awq"] = EngineLaunch(out / "merged-awq", "demo-reverse-awq", free_port(),
                                   log_path=out / "engine-awq.log", **common)
engines, gateway = [], None
try:
    for name, launch in launches.items():
        t0 = time.time()
        engines.append(Engine(launch).start(timeout_s=600))
        print(f"engine {name} ready in {time.time() - t0:.0f} s", flush=True)
    port = free_port()
    merged_args = [a for n in launches if n != "base"
                   for a in ("--merged", f"{launches[n].served_name}={engines[list(launches).index(n)].url}")]
    gateway = subprocess.Popen([".venv/bin/switchyard", "gateway", "--config", "artifacts/demo/switchyard.toml",
                                "--engine", engines[0].url, "--port", str(port), *merged_args])
    gw = f"http://127.0.0.1:{port}"
    wait_ok(f"{gw}/readyz", timeout_s=120)
    cmd = [sys.executable, "-m", "loadtests.compare_modes", "--adapter", f"{gw}@demo-reverse",
           "--merged", f"{gw}@demo-reverse-merged", "--concurrency", "1,4,16", "--requests", "48",
           "--rounds", "3", "--input-len", "128", "--output-len", "64", "--out", str(out / "report")]
    if awq:
        cmd[cmd.index("--concurrency"):cmd.index("--concurrency")] = ["--awq", f"{gw}@demo-reverse-awq"]
    print("+", " ".join(cmd), flush=True)
    sys.exit(subprocess.call(cmd))
finally:
    if gateway is not None:
        gateway.terminate()
        gateway.wait(30)
    for e in engines:
        e.stop()
PY
