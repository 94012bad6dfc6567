"""What the gateway costs at GPU rates: one engine, called straight and through `switchyard gateway`,
in ONE interleaved load test. Run on the lent GPU machine (loadtests/gpu/README.md).

    python -m loadtests.gpu.gateway_cost --model /tmp/g/base --out $OUT/gateway-cost \\
        [--previous CHECKOUT] [--asgi] [--concurrency 64,128] [--deadline EPOCH]

Arms, interleaved per round (loadtests.session): `direct` (the engine), `gateway` (this checkout),
`gateway-asgi` (this checkout with SWITCHYARD_DIRECT_STREAMS=false, with --asgi), `previous` (the
gateway of another checkout, e.g. an earlier commit from `git archive`, with --previous). Each gateway
is its own process in front of the same engine, so its CPU time over the run divided by the requests
it served is its CPU per request (summary.json, beside the load test's report).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.gateway import cpu_seconds, start_gateway
from deploy.engines import Engine, EngineLaunch, free_port, has_cuda_gpu
from loadtests.gpu.modes import gpu_description, log, pack_reports

NAME = "llama8b"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("/tmp/g/base"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--previous", type=Path, help="another checkout whose gateway runs as the `previous` arm")
    p.add_argument("--asgi", action="store_true", help="add the `gateway-asgi` arm")
    p.add_argument("--concurrency", default="64,128")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per arm, level and round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--engine-args", default="", help="extra vLLM arguments (CPU dry runs: --enforce-eager ...)")
    p.add_argument("--deadline", type=float, default=None, help="epoch seconds by which everything must stop")
    args = p.parse_args(argv)
    from loadtests.records import Target
    from loadtests.session import LoadTestOptions, execute
    from loadtests.workload import parse_levels

    t0 = time.time()
    deadline = args.deadline or t0 + 540
    out, model = args.out.resolve(), args.model.resolve()
    out.mkdir(parents=True, exist_ok=True)
    cuda = has_cuda_gpu()
    summary: dict = {"cuda": cuda, "settings": vars(args) | {"out": str(out), "model": str(model)}}
    if cuda:
        summary["gpu"] = gpu_description()
    config = out / "switchyard.toml"
    config.write_text(f'[base]\nmodel = "{model}"\nname = "{NAME}"\n\n[engine]\nmax_model_len = {args.max_model_len}\n')
    engine = Engine(EngineLaunch(model, NAME, free_port(), max_model_len=args.max_model_len,
                                 extra_args=tuple(args.engine_args.split()), log_path=out / "engine.log"))
    gateways: dict[str, subprocess.Popen] = {}
    try:
        engine.spawn()
        engine.wait_ready(timeout_s=max(10.0, deadline - time.time() - 120))
        log("engine ready", t0)
        targets = [Target("direct", engine.url, NAME)]
        arms = {"gateway": (None, None)}
        if args.asgi:
            arms["gateway-asgi"] = (None, {"SWITCHYARD_DIRECT_STREAMS": "false"})
        if args.previous:
            arms["previous"] = (args.previous.resolve(), None)
        for label, (checkout, env) in arms.items():
            port = free_port()
            gateways[label] = start_gateway(config, engine.url, port, env=env, checkout=checkout,
                                            log=open(out / f"{label}.log", "w"))
            targets.append(Target(label, f"http://127.0.0.1:{port}", NAME))
        log("gateways ready: " + ", ".join(gateways), t0)
        levels = tuple(parse_levels(args.concurrency, None, False))
        per = max(3.0, min(args.duration, (deadline - time.time() - 60) / (len(targets) * len(levels) * args.rounds) - 3))
        cpu0 = {label: cpu_seconds(proc.pid) for label, proc in gateways.items()}
        opts = LoadTestOptions(targets=tuple(targets), levels=levels, out=out / "report", requests=None,
                               duration_s=per, rounds=args.rounds, warmup=4, plots=False,
                               input_len=args.input_len, output_len=args.output_len, seed=0)
        summary["duration_s_per_batch"] = per
        outcome = execute(opts)
        served: dict[str, int] = {}
        with open(outcome.out / "requests.jsonl") as f:
            for line in f:  # every request a gateway served, warm-ups included (its CPU covers them)
                rec = json.loads(line)
                if rec.get("kind") == "request":
                    served[rec["target"]] = served.get(rec["target"], 0) + 1
        summary["requests"] = served
        summary["gateway_cpu_us_per_request"] = {
            label: round(1e6 * (cpu_seconds(proc.pid) - cpu0[label]) / max(1, served.get(label, 0)))
            for label, proc in gateways.items()}
        log(f"gateway CPU per request: {summary['gateway_cpu_us_per_request']}", t0)
        from loadtests.progress import comparison_table, summary_table
        from rich.console import Console

        console = Console(width=160)
        console.print(summary_table(outcome.results))
        console.print(comparison_table(outcome.results))
        return 0
    finally:
        for proc in gateways.values():
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        engine.stop(grace_s=10)
        summary["wall_s"] = round(time.time() - t0, 1)
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        pack_reports(out)


if __name__ == "__main__":
    sys.exit(main())
