"""Benchmark `switchyard quantize`: checkpoint size, wall time, peak memory, accuracy and perplexity.

Two modes, one JSON line per model on stdout (append them to a results file; docs/benchmarks.md
"Quantize" quotes them with this command line):

  random Llama-shaped checkpoints (time and memory only: random weights say nothing about accuracy)
    .venv/bin/python benchmarks/quantize.py random --shape small-256|tinyllama-1.1b [--layers N] [--samples 16 --seq-len 128]

  the demo's trained adapters, each merged (`merger.api.merge`) then quantized (calibrated on the
  adapter's training prompts, found through the merge's provenance); accuracy on its eval set
    .venv/bin/python benchmarks/quantize.py demo [--demo-dir artifacts/demo]

The random checkpoints are built in a scratch folder (deleted afterwards unless --keep).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPES = {
    # a small Llama (the demo's shape as first planned): hidden 256, intermediate 768, 4 layers
    "small-256": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=2048),
    # TinyLlama-1.1B's shape
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, vocab_size=32000),
}


def build_random_llama(path: Path, shape: dict, layers: int | None) -> None:
    """A random bf16 Llama with `shape` and a byte-level BPE tokenizer trained on a few lines."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from merger.calibration import BUILTIN_CALIBRATION, load_samples

    texts = [s.get("text") or " ".join(m["content"] for m in s["messages"]) for s in load_samples(BUILTIN_CALIBRATION)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=1000, special_tokens=["<s>", "</s>", "<pad>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                          "{% if add_generation_prompt %}<s>assistant: {% endif %}")
    fast.save_pretrained(path)
    cfg = dict(shape)
    if layers:
        cfg["num_hidden_layers"] = layers
    torch.manual_seed(0)
    config = LlamaConfig(**cfg, max_position_embeddings=2048, bos_token_id=0, eos_token_id=1, pad_token_id=2,
                         tie_word_embeddings=False, torch_dtype="bfloat16")
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    del model


def row(name: str, result, extra: dict) -> dict:
    r = result.report
    return {"model": name, **extra, **r.to_dict(), "out": str(result.out), "log": str(result.log_path)}


def bench_random(args) -> None:
    from merger.quantize import QuantizeOptions, quantize

    scratch = Path(tempfile.mkdtemp(prefix="bench-quantize-", dir=args.scratch))
    try:
        model = scratch / f"random-{args.shape}"
        t0 = time.perf_counter()
        build_random_llama(model, SHAPES[args.shape], args.layers)
        built = time.perf_counter() - t0
        options = QuantizeOptions(samples=args.samples, seq_len=args.seq_len, n_grid=args.n_grid,
                                  evaluate=not args.no_eval, eval_limit=0, calibration="builtin")
        result = quantize(model, None, options, progress=lambda k, t: k == "stage" and print(t, file=sys.stderr))
        layers = args.layers or SHAPES[args.shape]["num_hidden_layers"]
        print(json.dumps(row(f"random-{args.shape}", result, {
            "layers": layers, "samples": args.samples, "seq_len": args.seq_len, "n_grid": args.n_grid,
            "build_s": round(built, 1), "cpus": os.cpu_count()})), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)


def bench_demo(args) -> None:
    from merger.api import MergeOptions, merge
    from merger.quantize import QuantizeOptions, quantize
    from switchyard.config import load_config

    if args.adapter:  # explicit (name, adapter folder, eval file) triples, e.g. a demo still being built
        base = args.base
        adapters = [(name, Path(path), Path(ev)) for name, path, ev in args.adapter]
    else:
        config = load_config(args.demo_dir / "switchyard.toml")
        base = config.base.model
        adapters = [(a.name, a.path, a.eval) for a in config.adapters]
    scratch = Path(tempfile.mkdtemp(prefix="bench-quantize-demo-", dir=args.scratch))
    try:
        from demo.train import reply_text  # the demo writes replies with a leading space

        for name, adapter_path, eval_path in adapters:
            # perplexity of the eval answers given their prompts, in the form the demo model was trained on
            heldout = scratch / f"{name}-heldout.jsonl"
            with open(eval_path) as f, open(heldout, "w") as g:
                for line in filter(str.strip, f):
                    item = json.loads(line)
                    g.write(json.dumps({"messages": [{"role": "user", "content": item["prompt"]},
                                                     {"role": "assistant", "content": reply_text(item["expected"])}]}) + "\n")
            merged = scratch / f"{name}-merged"
            merge(base, [adapter_path], merged, MergeOptions())
            options = QuantizeOptions(samples=args.samples, seq_len=args.seq_len, n_grid=args.n_grid,
                                      eval_set=eval_path, eval_limit=args.eval_limit, heldout=heldout)
            result = quantize(merged, None, options,
                              progress=lambda k, t: k == "stage" and print(t, file=sys.stderr))
            print(json.dumps(row(name, result, {
                "samples": args.samples, "seq_len": args.seq_len, "n_grid": args.n_grid,
                "calibration": result.provenance["quantization"]["calibration"]["source"]})), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    r = sub.add_parser("random")
    r.add_argument("--shape", choices=sorted(SHAPES), default="small-256")
    r.add_argument("--layers", type=int, default=None, help="override the layer count")
    r.add_argument("--no-eval", action="store_true", help="skip the perplexity pass")
    d = sub.add_parser("demo")
    d.add_argument("--demo-dir", type=Path, default=ROOT / "artifacts" / "demo")
    d.add_argument("--eval-limit", type=int, default=100)
    d.add_argument("--base", type=Path, help="with --adapter: the base checkpoint")
    d.add_argument("--adapter", nargs=3, action="append", metavar=("NAME", "PATH", "EVAL"),
                   help="an adapter to merge and quantize, instead of reading --demo-dir/switchyard.toml")
    for q in (r, d):
        q.add_argument("--samples", type=int, default=64)
        q.add_argument("--seq-len", type=int, default=512)
        q.add_argument("--n-grid", type=int, default=20)
        q.add_argument("--scratch", type=Path, default=None, help="scratch folder (default: $TMPDIR)")
        q.add_argument("--keep", action="store_true")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    (bench_random if args.mode == "random" else bench_demo)(args)


if __name__ == "__main__":
    main()
