"""Adapter vs merged bf16 vs merged AWQ on one GPU, through switchyard's gateway, in ONE interleaved
load test (issue 7's GPU comparison). Run by loadtests/gpu/run.sh on the lent GPU machine.

    python -m loadtests.gpu.modes --models /tmp/g --out $OUT [--deadline EPOCH]

MODELS holds what gen_models.py writes: `base/` (bf16, Llama-3-8B shape, random weights: with fixed
output lengths the values do not change the compute), `lora/` (rank 16 on every linear layer) and
`awq/` (W4A16 compressed-tensors, group 128). The merged bf16 checkpoint is made here by
`switchyard merge base lora` (timed), while the adapter and AWQ engines start; if the merge fails
the merged engine serves `base/` (same shapes) and the summary says so.

All three engines share the GPU: each gets a fixed KV cache (`--kv-cache-memory-bytes`), because
vLLM's profiling-based sizing reads the device's free memory, which the other engines change while
they start. The run stops at --deadline (epoch seconds), keeping what finished: the gateway run
first, then (time permitting) the same comparison straight to the engines, then `vllm bench serve`
on the merged engine as the cross-check. Everything lands in OUT: the reports packed as
reports.tar.gz (no PNGs: unpack, then `python -m loadtests.plots DIR`), engine logs, summary.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from deploy.engines import Engine, EngineLaunch, free_port, has_cuda_gpu, wait_ok

BASE, ADAPTER, MERGED, AWQ = "llama8b", "llama8b-ad", "llama8b-merged", "llama8b-awq"
MODES = {"adapter": ADAPTER, "merged": MERGED, "awq": AWQ}


def write_config(models: Path, max_model_len: int) -> Path:
    path = models / "switchyard.toml"
    path.write_text(f"""# written by loadtests/gpu/modes.py
[base]
model = "base"
name = "{BASE}"

[engine]
max_lora_rank = 16
max_loras = 1
max_model_len = {max_model_len}

[gateway]
state_dir = "state"

[[adapters]]
name = "{ADAPTER}"
path = "lora"
""")
    return path


def gpu_description() -> str:
    """The GPU's name, memory and driver, as nvidia-smi reports them (for a run's summary)."""
    return subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                          capture_output=True, text=True).stdout.strip()


def log(msg: str, t0: float) -> None:
    print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=Path, default=Path("/tmp/g"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--deadline", type=float, default=None, help="epoch seconds by which everything must stop")
    p.add_argument("--concurrency", default="1,16,64")
    p.add_argument("--duration", type=float, default=15.0, help="measured seconds per mode and level")
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--kv-cache", default=None,
                   help="KV cache per engine (--kv-cache-memory-bytes) [default: 10G on a GPU of 100 GiB "
                        "or more, else 6G: three 8B engines share the card; c=64 x 640 tokens needs 5 GiB]")
    p.add_argument("--gpu-util", default="0.2", help="only the start-up free-memory check reads it")
    args = p.parse_args(argv)
    t0 = time.time()
    deadline = args.deadline or t0 + 540
    out, models = args.out.resolve(), args.models.resolve()
    out.mkdir(parents=True, exist_ok=True)
    cuda = has_cuda_gpu()
    summary: dict = {"cuda": cuda, "settings": vars(args) | {"out": str(out), "models": str(models)}}
    if cuda:
        summary["gpu"] = gpu_description()
    if args.kv_cache is None:
        total_mib = 0.0
        if cuda:
            total_mib = float(subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                                             capture_output=True, text=True).stdout.split()[0])
        args.kv_cache = "10G" if total_mib >= 100 * 1024 else "6G"
    summary["kv_cache"] = args.kv_cache
    gpu_args = ("--kv-cache-memory-bytes", args.kv_cache, "--gpu-memory-utilization", args.gpu_util) if cuda else ()
    config = write_config(models, args.max_model_len)

    def launch(model: Path, name: str, **kw) -> EngineLaunch:
        return EngineLaunch(model, name, free_port(), max_model_len=args.max_model_len, extra_args=gpu_args,
                            log_path=out / f"engine-{name}.log", **kw)

    engines: dict[str, Engine] = {}
    procs: list[subprocess.Popen] = []
    try:
        # 1. merge (timed) while the adapter and AWQ engines start
        merged_dir = models / "merged"
        merge_cmd = [sys.executable, "-m", "switchyard", "merge", str(models / "base"), str(models / "lora"),
                     "--out", str(merged_dir), "--device", "cuda" if cuda else "cpu", "--force"]
        merge_log = open(out / "merge.log", "w")
        merge = subprocess.Popen(merge_cmd, stdout=merge_log, stderr=subprocess.STDOUT)
        t_merge = time.time()
        engines["adapter"] = Engine(launch(models / "base", BASE, enable_lora=True, max_lora_rank=16, max_loras=1,
                                           lora_modules=((ADAPTER, models / "lora"),)))
        if (models / "awq").is_dir():  # absent for a dry run where 4-bit cannot be served (AVX2 CPU)
            engines["awq"] = Engine(launch(models / "awq", AWQ))
        for e in engines.values():
            e.spawn()
        log("adapter and awq engines spawned; merging", t0)
        try:
            rc = merge.wait(timeout=max(30.0, min(300.0, deadline - time.time() - 300)))
        except subprocess.TimeoutExpired:
            merge.kill()
            rc = "timeout"
        merge_log.close()
        summary["merge"] = {"cmd": " ".join(merge_cmd[1:]), "rc": rc, "wall_s": round(time.time() - t_merge, 1),
                            "tail": (out / "merge.log").read_text(errors="replace")[-1500:]}
        served = merged_dir if rc == 0 else models / "base"
        summary["merged_engine_model"] = str(served)
        log(f"merge rc={rc} in {summary['merge']['wall_s']} s; merged engine serves {served}", t0)
        engines["merged"] = Engine(launch(served, MERGED))
        engines["merged"].spawn()
        ready = {}
        for mode, e in engines.items():
            e.wait_ready(timeout_s=max(10.0, deadline - time.time() - 120))
            ready[mode] = round(time.time() - t0, 1)
            log(f"{mode} engine ready", t0)
        summary["ready_at_s"] = ready
        if cuda:
            summary["gpu_memory_used"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader"],
                capture_output=True, text=True).stdout.strip()

        # 2. the gateway in front of all three
        gport = free_port()
        gw_cmd = [sys.executable, "-m", "switchyard", "gateway", "--config", str(config),
                  "--engine", engines["adapter"].url, "--port", str(gport),
                  "--merged", f"{MERGED}={engines['merged'].url}"]
        if "awq" in engines:
            gw_cmd += ["--merged", f"{AWQ}={engines['awq'].url}"]
        gw_log = open(out / "gateway.log", "w")
        procs.append(subprocess.Popen(gw_cmd, stdout=gw_log, stderr=subprocess.STDOUT))
        gw = f"http://127.0.0.1:{gport}"
        wait_ok(f"{gw}/readyz", timeout_s=60)
        log("gateway ready", t0)

        levels = args.concurrency.split(",")

        def compare(name: str, urls: dict[str, str], conc: str, duration: float) -> None:
            cmd = [sys.executable, "-m", "loadtests.compare_modes", "--concurrency", conc,
                   "--duration", f"{duration:g}", "--rounds", "3", "--warmup", "4",
                   "--input-len", str(args.input_len), "--output-len", str(args.output_len),
                   "--no-plots", "--out", str(out / name)]
            for mode, url in urls.items():
                cmd += [f"--{mode}", f"{url}@{MODES[mode]}"]
            log("+ " + " ".join(cmd[1:]), t0)
            t = time.time()
            rc = subprocess.call(cmd, timeout=max(10.0, deadline - time.time() - 20))
            summary.setdefault("runs", {})[name] = {"cmd": " ".join(cmd[1:]), "rc": rc,
                                                     "wall_s": round(time.time() - t, 1)}

        # 3. the headline: through the gateway, interleaved. Budget ~3 s per batch beyond the
        #    measured time (warm-up, drain at the end of each batch).
        modes = [m for m in MODES if m in engines]
        per_mode_level = max(3.0, min(args.duration, (deadline - time.time() - 90) / (len(modes) * len(levels)) - 4))
        compare("through-gateway", {m: gw for m in modes}, args.concurrency, per_mode_level)
        # 4. the same, straight to the engines: what the gateway costs at GPU rates
        if deadline - time.time() > 75:
            direct = {m: engines[m].url for m in modes}
            compare("direct", direct, ",".join(levels[-2:]),
                    max(3.0, min(8.0, (deadline - time.time() - 45) / (2 * len(modes)) - 4)))
        # 5. cross-check: vllm bench serve on the merged engine at the top level
        if deadline - time.time() > 40:
            c = int(levels[-1])
            bench = [sys.executable, "-m", "vllm.entrypoints.cli.main", "bench", "serve", "--backend", "openai",
                     "--base-url", engines["merged"].url, "--model", MERGED, "--tokenizer", str(models / "base"),
                     "--dataset-name", "random", "--random-input-len", str(args.input_len),
                     "--random-output-len", str(args.output_len), "--ignore-eos", "--num-prompts", str(4 * c),
                     "--max-concurrency", str(c), "--request-rate", "inf", "--save-result",
                     "--result-dir", str(out), "--result-filename", f"vllm-bench-merged-c{c}.json", "--seed", "1"]
            with open(out / "vllm-bench.log", "w") as f:
                rc = subprocess.call(bench, stdout=f, stderr=subprocess.STDOUT,
                                     timeout=max(10.0, deadline - time.time() - 10))
            summary["vllm_bench"] = {"cmd": " ".join(bench[1:]), "rc": rc}
        return 0
    finally:
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        for e in engines.values():
            e.stop(grace_s=10)
        summary["wall_s"] = round(time.time() - t0, 1)
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        for f in out.glob("engine-*.log"):  # keep only the useful part of large logs
            text = f.read_text(errors="replace")
            if len(text) > 200_000:
                f.write_text(text[:50_000] + "\n...\n" + text[-100_000:])
        shutil.rmtree(models / "state", ignore_errors=True)
        pack_reports(out)


def pack_reports(out: Path) -> Path | None:
    """The report folders as one reports.tar.gz: the device hands back few, small files, and a run's
    per-request report.json alone can exceed that (the first H200 run lost its reports so)."""
    import tarfile

    folders = [d for d in sorted(out.iterdir()) if d.is_dir() and (d / "report.json").is_file()]
    if not folders:
        return None
    archive = out / "reports.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for d in folders:
            tar.add(d, arcname=d.name)
    for d in folders:
        shutil.rmtree(d)
    return archive


if __name__ == "__main__":
    sys.exit(main())
