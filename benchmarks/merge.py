"""Merge benchmark: switchyard vs PEFT vs `cp -r` + `sync`, side by side in one run.

Builds a random Llama-shaped bf16 checkpoint (TinyLlama-1.1B's shape, 3 shards; or an 8B shape with
--shape 8b) and a rank-16 all-linear LoRA adapter, then times each contender in its own process with
/usr/bin/time -v (wall time, peak RSS). The page cache is warmed first so every contender reads the
base from memory; with --cold the base and adapter files are instead dropped from the page cache before
every run (posix_fadvise DONTNEED), so every contender reads them from disk. `cp` and switchyard (base hash cached) alternate for --rounds rounds and their
medians are compared; every run starts after removing the previous output, `sync` and a 1 s pause.
Writes a "Merge" section into docs/benchmarks.md with --write-docs.

    .venv/bin/python benchmarks/merge.py --write-docs
    .venv/bin/python benchmarks/merge.py --cold --write-docs
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab
    "tinyllama": (2048, 5632, 22, 32, 4, 32000),
    "8b": (4096, 14336, 32, 32, 8, 128256),
}
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_checkpoint(path: Path, shape: str, shards: int) -> None:
    import torch

    sys.path.insert(0, str(ROOT))
    from merger.io.writer import OutTensor, StreamingShardWriter, index_json, plan_shards

    h, inter, layers, heads, kv, vocab = SHAPES[shape]
    hd = h // heads
    shapes = {"model.embed_tokens.weight": (vocab, h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                   p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv * hd, h),
                   p + "self_attn.v_proj.weight": (kv * hd, h), p + "self_attn.o_proj.weight": (h, h),
                   p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                   p + "mlp.down_proj.weight": (h, inter)}
    shapes |= {"model.norm.weight": (h,), "lm_head.weight": (vocab, h)}
    tensors = [OutTensor(n, "BF16", s) for n, s in shapes.items()]
    total = sum(t.nbytes for t in tensors)
    plans = plan_shards(tensors, total // shards + 1)
    path.mkdir(parents=True)
    writer = StreamingShardWriter(path, plans)
    gen = torch.Generator().manual_seed(0)
    for t in tensors:
        value = torch.ones(t.shape, dtype=torch.bfloat16) if len(t.shape) == 1 else \
            (torch.randn(t.shape, generator=gen) * 0.02).to(torch.bfloat16)
        writer.write(t.name, value.reshape(-1).view(torch.uint8).numpy())
    writer.close()
    if len(plans) > 1:
        (path / "model.safetensors.index.json").write_text(json.dumps(index_json(plans)))
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "dtype": "bfloat16",
        "hidden_act": "silu", "rope_theta": 10000.0}))


def build_adapter(path: Path, shape: str, rank: int = 16) -> None:
    import torch
    from safetensors.torch import save_file

    h, inter, layers, heads, kv, vocab = SHAPES[shape]
    hd = h // heads
    dims = {"q_proj": (h, h), "k_proj": (kv * hd, h), "v_proj": (kv * hd, h), "o_proj": (h, h),
            "gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter)}
    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for i in range(layers):
        for proj, (out_f, in_f) in dims.items():
            part = "self_attn" if proj in PROJ[:4] else "mlp"
            k = f"base_model.model.model.layers.{i}.{part}.{proj}"
            tensors[f"{k}.lora_A.weight"] = torch.randn(rank, in_f, generator=gen) * 0.01
            tensors[f"{k}.lora_B.weight"] = torch.randn(out_f, rank, generator=gen) * 0.01
    path.mkdir(parents=True)
    save_file(tensors, path / "adapter_model.safetensors")
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(PROJ),
        "bias": "none", "task_type": "CAUSAL_LM", "lora_dropout": 0.0}))


def evict(*folders: Path) -> None:
    """Drop the files' pages from the page cache (clean pages only: call after a sync). The Python
    environment stays cached: the comparison is a model that is not in memory, not a cold machine."""
    for folder in folders:
        for f in folder.rglob("*"):
            if f.is_file():
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def timed(cmd: list[str], env: dict | None = None, may_fail: bool = False) -> dict:
    """Wall seconds and peak RSS of `cmd` (in a fresh process, via /usr/bin/time -v). With `may_fail`
    a failure (PEFT killed for memory on the 8B shape) is recorded instead of ending the benchmark."""
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        if not may_fail:
            raise SystemExit(f"{cmd[0]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        signal = re.search(r"Command terminated by signal (\d+)", proc.stderr)
        print(proc.stderr[-3000:], file=sys.stderr)
        return {"seconds": wall, "failed": f"killed by signal {signal.group(1)}" if signal else
                f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1][:200] if proc.stderr.strip() else ''}"}
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    cpu = sum(float(re.search(rf"{k} time \(seconds\): ([\d.]+)", proc.stderr).group(1)) for k in ("User", "System"))
    return {"seconds": wall, "cpu_seconds": cpu, "peak_rss_mb": rss_kb / 1024}


def summarize(runs: list[dict]) -> dict:
    """Median wall and CPU seconds of several runs, their range, the largest peak."""
    import statistics

    ok = [r for r in runs if "failed" not in r]
    if not ok:
        return runs[-1]
    return {"seconds": statistics.median(r["seconds"] for r in ok),
            "cpu_seconds": statistics.median(r["cpu_seconds"] for r in ok),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in ok), "runs": [round(r["seconds"], 2) for r in ok]}


PEFT_SCRIPT = """
import os, sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
merged.save_pretrained(out)
os.sync()
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama")
    ap.add_argument("--shards", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/switchyard-merge-bench"))
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--rounds", type=int, default=3, help="alternating cp / switchyard (cached hash) runs")
    ap.add_argument("--cold", action="store_true", help="base and adapter read from disk, not the page cache")
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()
    work = args.workdir / args.shape
    base, adapter = work / "base", work / "adapter"
    if not base.exists():
        print(f"building {args.shape} checkpoint in {base} ...", flush=True)
        build_checkpoint(base, args.shape, args.shards)
        build_adapter(adapter, args.shape)
    env = dict(os.environ, HF_HUB_OFFLINE="1", XDG_CACHE_HOME=str(work / "cache"))
    # the hash cache only: the first run below hashes the base; the native kernel's build, if any, is kept
    (work / "cache" / "switchyard" / "sha256.json").unlink(missing_ok=True)
    size_gb = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 1e9
    if not args.cold:
        subprocess.run(f"cat {base}/*.safetensors > /dev/null", shell=True, check=True)  # warm the page cache
    load = os.getloadavg()[0]

    def settle(path: Path) -> None:  # the same page-cache state before every timed run
        shutil.rmtree(path, ignore_errors=True)
        os.sync()
        if args.cold:
            evict(base, adapter)
        time.sleep(1)

    results = {}
    sy = [str(ROOT / ".venv/bin/switchyard"), "merge", str(base), str(adapter), "--quiet", "--force"]
    settle(work / "sy")
    results["switchyard (first: hashes the base)"] = timed(sy + ["--out", str(work / "sy")], env)
    # cp and switchyard alternate, medians reported: on these VMs cp alone swings 1.6-6.4 s with the
    # page cache's state, so one run of each says little. Each output is removed before the next run
    # (four 16 GB copies of the 8B shape do not fit the disk).
    runs: dict[str, list] = {"cp -r + sync": [], "switchyard (base hash cached)": []}
    for _ in range(args.rounds):
        settle(work / "copy")
        runs["cp -r + sync"].append(timed(["bash", "-c", f"cp -r {base} {work / 'copy'} && sync"]))
        settle(work / "copy")
        settle(work / "sy")
        runs["switchyard (base hash cached)"].append(timed(sy + ["--out", str(work / "sy")], env))
    results = {name: summarize(r) for name, r in runs.items()} | results
    prov = json.loads((work / "sy" / "switchyard.json").read_text())
    shutil.rmtree(work / "sy")
    if not args.skip_peft:
        settle(work / "peft")
        results["PEFT merge_and_unload"] = timed([sys.executable, "-c", PEFT_SCRIPT, str(base), str(adapter),
                                                  str(work / "peft")], env, may_fail=True)
        shutil.rmtree(work / "peft", ignore_errors=True)
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    report = {"shape": args.shape, "cold": args.cold, "base_gb": size_gb, "mem_gib": mem_gib, "load_before": load, "after_load": os.getloadavg()[0],
              "results": results, "vanished_share": prov["rounding"]["vanished_share"]}
    print(json.dumps(report, indent=2))
    if args.write_docs:
        write_docs(report, " ".join(["benchmarks/merge.py", *sys.argv[1:]]))


def write_docs(report: dict, command: str) -> None:
    doc = ROOT / "docs" / "benchmarks.md"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    cp = report["results"]["cp -r + sync"]["seconds"]
    def wall(r: dict) -> str:
        spread = f" ({min(r['runs']):.1f}-{max(r['runs']):.1f}, {len(r['runs'])} runs)" if len(r.get("runs", [])) > 1 else ""
        return f"{r['seconds']:.1f}{spread}"

    rows = "\n".join(f"| {name} | {wall(r)} | {r['seconds'] / cp:.2f}x | {r['cpu_seconds']:.1f} | "
                     f"{r['peak_rss_mb']:.0f} |" if "failed" not in r else
                     f"| {name} | failed after {r['seconds']:.1f} s: {r['failed']} | | | |"
                     for name, r in report["results"].items())
    peft = report["results"].get("PEFT merge_and_unload")
    sy = report["results"]["switchyard (base hash cached)"]
    speedup = f"switchyard is {peft['seconds'] / sy['seconds']:.1f}x faster than PEFT. " if peft and "failed" not in peft else ""
    heading = f"### {report['shape']}" + (", model files not cached" if report.get("cold") else "") + " ("
    cache = ("base and adapter dropped from the page cache before every run, so read from disk" if report.get("cold")
             else "base read through the page cache")
    block = f"""{heading}{report['base_gb']:.2f} GB bf16, rank-16 all-linear adapter)

Command: `.venv/bin/python {command}` ({os.cpu_count()} CPU cores, {report.get('mem_gib', 0):.0f} GiB of memory,
{cache}, load average {report['load_before']:.1f} before / {report['after_load']:.1f} after).

| contender | wall s (median, range) | vs cp (medians) | CPU s (user+sys, median) | peak RSS MB |
|---|---|---|---|---|
{rows}

{speedup}Delta entries rounded away in bf16: {report['vanished_share']:.2%}. CPU seconds are the steadier
comparison on a shared machine. Every row includes interpreter start-up; PEFT's also `import torch` (about 2 s
of CPU), switchyard's only where its torch-free path does not apply (`resources.torch` in switchyard.json).
"""
    section_re = re.compile(r"(## Merge\n)(.*?)(?=\n## |\Z)", re.S)
    m = section_re.search(text)
    body = m.group(2) if m else ""
    sub_re = re.compile(rf"{re.escape(heading)}.*?(?=\n### |\Z)", re.S)
    body = sub_re.sub(block.rstrip() + "\n", body) if sub_re.search(body) else body.rstrip() + "\n\n" + block
    new = f"## Merge\n\n{body.strip()}\n"
    text = section_re.sub(lambda _: new, text) if m else text.rstrip() + "\n\n" + new
    doc.write_text(text)


if __name__ == "__main__":
    main()
