"""The half of `switchyard quantize` that runs inside `.venv-quant` (llm-compressor's own environment).

Run as `.venv-quant/bin/python merger/quant_worker.py REQUEST.json`. It imports only the standard
library at module level (so `.venv` can import it for its pure helpers) and never switchyard's own
modules: `.venv-quant` does not have them.

Protocol with the driver (`merger/quantize.py`):
  * the request is one JSON file (a `job` plus its arguments, see `run_quantize`/`run_evaluate`/
    `run_prompts`); calibration, eval and held-out sets arrive as JSONL files the driver normalised;
  * progress and the outcome are single lines on stdout, `@@switchyard {json}`; anything else on
    stdout/stderr (llm-compressor's logs and progress bars) is for the log file;
  * a failure is one `{"event": "error", "kind": ..., "message": ...}` line and exit code 3, so the
    driver can say what went wrong in one line; anything uncaught is a crash (exit 1, see the log).
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from pathlib import Path

EVENT_PREFIX = "@@switchyard "
EXIT_REPORTED = 3


class WorkerFailure(Exception):
    """A failure with a known cause: reported as one `error` event, not a traceback."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


# --- pure helpers (also imported by the driver's tests in .venv) --------------------------------------

def event_line(event: str, **fields) -> str:
    return EVENT_PREFIX + json.dumps({"event": event, **fields}, sort_keys=True)


def parse_event(line: str) -> dict | None:
    """The event dict carried by one output line, or None for ordinary log output."""
    start = line.find(EVENT_PREFIX)
    if start < 0:
        return None
    try:
        payload = json.loads(line[start + len(EVENT_PREFIX):])
    except ValueError:
        return None
    return payload if isinstance(payload, dict) and "event" in payload else None


def indivisible_layers(in_features: dict[str, int], group_size: int) -> list[tuple[str, int]]:
    """Quantized layers whose input width is not a multiple of `group_size` (vLLM's WNA16 kernels need it)."""
    return sorted((name, n) for name, n in in_features.items() if n % group_size != 0)


def matches_ignore(name: str, ignore: list[str]) -> bool:
    """llm-compressor's ignore syntax: `re:<regex>` or a module name / name suffix."""
    import re

    for pattern in ignore:
        if pattern.startswith("re:"):
            if re.match(pattern[3:], name):
                return True
        elif name == pattern or name.endswith("." + pattern):
            return True
    return False


def exact_match(generated: str, expected: str) -> bool:
    """The demo's accuracy rule: the answer, stripped of surrounding whitespace, equals the expected one."""
    return generated.strip() == expected.strip()


def perplexity(total_nll: float, total_tokens: int) -> float:
    """exp(mean negative log-likelihood per predicted token); inf when nothing was predicted."""
    return math.exp(total_nll / total_tokens) if total_tokens else float("inf")


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def cpu_seconds() -> float:
    """User + system CPU time of this process: on a shared machine, steadier than wall time."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_mib() -> float:
    """VmHWM, not ru_maxrss, which on Linux keeps the parent's peak across fork + exec (as
    merger/provenance.py's peak_rss_bytes; this worker runs in the quantize environment, apart)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


# --- the edges: everything below needs torch / transformers / llm-compressor ----------------------------

def emit(event: str, **fields) -> None:
    sys.stdout.write(event_line(event, **fields) + "\n")
    sys.stdout.flush()


def _no_pin_memory() -> None:
    import torch

    # llm-compressor pins cached activations for faster host->accelerator copies; without an
    # accelerator `pin_memory` raises, and on CPU pinning buys nothing: make it the identity.
    if not torch.accelerator.is_available():
        torch.Tensor.pin_memory = lambda self, *args, **kwargs: self


def _library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("llmcompressor", "compressed-tensors", "transformers", "torch"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "missing"
    return out


def _load_model(path: str, dtype: str = "auto"):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds for unknown configs
        raise WorkerFailure("architecture", f"transformers cannot read {path}/config.json: {exc}") from exc
    arch = ",".join(getattr(config, "architectures", None) or [config.model_type])
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype if dtype == "auto" else getattr(torch, dtype))
    except Exception as exc:  # noqa: BLE001
        raise WorkerFailure("architecture", f"cannot load {arch} as a causal LM: {exc}") from exc
    model.eval()
    return model, arch


def _checkpoint_dtype(path: str) -> str | None:
    """The dtype config.json declares (`dtype`, or the older `torch_dtype`), e.g. "bfloat16"."""
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config.get("dtype") or config.get("torch_dtype")


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001
        raise WorkerFailure("tokenizer", f"cannot load the tokenizer of {path}: {exc}") from exc


def render_sample(tokenizer, sample: dict) -> str:
    """A calibration/held-out sample as text: chat messages go through the model's chat template."""
    if "messages" in sample:
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(sample["messages"], tokenize=False)
        return "\n".join(f"{m['role']}: {m['content']}" for m in sample["messages"])
    return sample["text"]


def _linear_in_features(model, ignore: list[str]) -> dict[str, int]:
    import torch

    return {
        name: module.in_features
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not matches_ignore(name, ignore)
    }


def _check_awq_handles(model, arch: str, ignore: list[str]) -> None:
    """Refuse models AWQ would pass through untouched: llm-compressor warns and writes them unchanged."""
    from llmcompressor.modifiers.transform.awq import get_layer_mappings_from_model

    if not _linear_in_features(model, ignore):
        raise WorkerFailure("architecture", f"{arch} has no torch.nn.Linear layers left to quantize "
                            "(it uses other layer types, e.g. GPT-2's Conv1D, or --ignore covers them all)")
    smooth = [m.smooth_layer for m in get_layer_mappings_from_model(model)]
    if not any(matches_ignore(name, smooth) for name, _ in model.named_modules()):
        raise WorkerFailure("architecture", f"llm-compressor's AWQ has no layer mapping for {arch}: none of "
                            f"its smoothing layers ({', '.join(smooth[:3])}, ...) exist in the model")


def _build_recipe(scheme: str, group_size: int, ignore: list[str], n_grid: int):
    from compressed_tensors.quantization import preset_name_to_scheme
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    qscheme = preset_name_to_scheme(scheme, ["Linear"])
    qscheme.weights = qscheme.weights.model_copy(update={"group_size": group_size})
    return [
        AWQModifier(duo_scaling=True, n_grid=n_grid),
        QuantizationModifier(config_groups={"group_0": qscheme}, ignore=list(ignore)),
    ]


def run_quantize(req: dict) -> dict:
    """Calibrate AWQ on `req["calibration"]`, write a pack-quantized checkpoint to `req["out"]`."""
    import torch

    _no_pin_memory()
    torch.manual_seed(req.get("seed", 0))
    t0 = time.monotonic()
    emit("stage", stage="load", message=f"loading {req['model']}")
    saved_dtype = _checkpoint_dtype(req["model"])
    # CPUs without native bf16/fp16 GEMMs run them several times slower than float32: calibrate in
    # float32 there and cast back before saving, so the checkpoint keeps its dtype.
    work_dtype = "float32" if (not torch.accelerator.is_available() and saved_dtype in ("bfloat16", "float16")) else "auto"
    model, arch = _load_model(req["model"], work_dtype)
    tokenizer = _load_tokenizer(req["model"])

    group_size, ignore = int(req["group_size"]), list(req["ignore"])
    _check_awq_handles(model, arch, ignore)
    bad = indivisible_layers(_linear_in_features(model, ignore), group_size)
    if bad:
        listed = ", ".join(f"{n} (in_features={k})" for n, k in bad[:4])
        more = f" and {len(bad) - 4} more" if len(bad) > 4 else ""
        raise WorkerFailure(
            "group_size",
            f"{len(bad)} layer(s) of {arch} have an input width that is not a multiple of the group size "
            f"{group_size}: {listed}{more}",
        )

    samples = read_jsonl(req["calibration"])[: int(req["samples"])]
    seq_len = int(req["seq_len"])
    rows = [tokenizer(render_sample(tokenizer, s), truncation=True, max_length=seq_len,
                      add_special_tokens=False) for s in samples]
    rows = [r for r in rows if len(r["input_ids"]) > 1]
    n_tokens = sum(len(r["input_ids"]) for r in rows)
    # AWQ picks per-channel scales from activation statistics; fewer calibration tokens than one
    # quantization group leaves those statistics to noise.
    if n_tokens < group_size:
        raise WorkerFailure(
            "calibration_too_small",
            f"calibration gives {len(rows)} sample(s), {n_tokens} tokens: fewer than the group size "
            f"{group_size}",
        )
    emit("stage", stage="calibrate", message=f"AWQ {req['scheme']} g{group_size} on {arch}: "
         f"{len(rows)} samples, {n_tokens} tokens", samples=len(rows), tokens=n_tokens)

    from datasets import Dataset
    from llmcompressor import oneshot

    dataset = Dataset.from_dict({
        "input_ids": [r["input_ids"] for r in rows],
        "attention_mask": [r["attention_mask"] for r in rows],
    })
    recipe = _build_recipe(req["scheme"], group_size, ignore, int(req.get("n_grid", 20)))
    try:
        oneshot(model=model, dataset=dataset, recipe=recipe, max_seq_length=seq_len,
                num_calibration_samples=len(rows), shuffle_calibration_samples=False)
    except Exception as exc:  # noqa: BLE001 - llm-compressor's errors are many and arch-specific
        raise WorkerFailure("quantizer", f"llm-compressor could not quantize {arch}: "
                            f"{type(exc).__name__}: {exc}") from exc

    emit("stage", stage="save", message=f"writing the compressed checkpoint to {req['out']}")
    if work_dtype != "auto":
        model.to(getattr(torch, saved_dtype))
        model.config.dtype = saved_dtype
    model.save_pretrained(req["out"], save_compressed=True)
    tokenizer.save_pretrained(req["out"])
    wall = time.monotonic() - t0
    return {
        "architecture": arch,
        "samples": len(rows),
        "tokens": n_tokens,
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu_seconds(), 1),
        "calibration_dtype": "float32" if work_dtype != "auto" else saved_dtype,
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "libraries": _library_versions(),
    }


def _answers(model, tokenizer, items: list[dict], extra_tokens: int, batch_size: int = 32) -> list[str]:
    """Greedy replies to each item's prompt as a user turn (chat template), batched with left padding.

    The budget is the longest expected answer plus `extra_tokens`: room to show a wrong, longer reply."""
    import torch

    if not items:
        return []
    budget = max(len(tokenizer(i["expected"], add_special_tokens=False)["input_ids"]) for i in items) + extra_tokens
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    old_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    replies: list[str] = []
    try:
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            if getattr(tokenizer, "chat_template", None):
                texts = [tokenizer.apply_chat_template([{"role": "user", "content": i["prompt"]}],
                                                       add_generation_prompt=True, tokenize=False) for i in chunk]
            else:
                texts = [i["prompt"] for i in chunk]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=budget, do_sample=False,
                                     eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)
            replies += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = old_side
    return replies


def scored_span(sample: dict, tokenizer) -> tuple[str, str]:
    """(context, text): perplexity counts the tokens of `text` only, given `context`. For a chat ending
    in an assistant turn that is the reply given the conversation (what a served model must predict);
    for plain text, all of it."""
    msgs = sample.get("messages")
    if msgs and msgs[-1]["role"] == "assistant" and getattr(tokenizer, "chat_template", None):
        context = tokenizer.apply_chat_template(msgs[:-1], add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(msgs, tokenize=False)
        if full.startswith(context):
            return context, full[len(context):]
    return "", render_sample(tokenizer, sample)


def _perplexity(model, tokenizer, samples: list[dict], seq_len: int) -> tuple[float, int]:
    import torch

    total_nll, total_tokens = 0.0, 0
    for sample in samples:
        context, text = scored_span(sample, tokenizer)
        ctx = tokenizer(context, add_special_tokens=False)["input_ids"] if context else []
        ids = (ctx + tokenizer(text, add_special_tokens=False)["input_ids"])[:seq_len]
        labels = [-100] * len(ctx) + ids[len(ctx):]  # -100: not scored
        n = sum(1 for t in labels[1:] if t != -100)
        if n == 0:
            continue
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss  # mean over n
        total_nll += float(loss) * n
        total_tokens += n
    return perplexity(total_nll, total_tokens), total_tokens


def evaluate_model(path: str, eval_items: list[dict], heldout: list[dict], seq_len: int,
                   extra_tokens: int = 8) -> dict:
    """Exact-match accuracy (greedy, chat template) on `eval_items` and perplexity on `heldout`."""
    model, _ = _load_model(path)
    tokenizer = _load_tokenizer(path)
    correct, answers = 0, []
    for item, got in zip(eval_items, _answers(model, tokenizer, eval_items, extra_tokens), strict=True):
        ok = exact_match(got, item["expected"])
        correct += ok
        answers.append({"prompt": item["prompt"], "expected": item["expected"], "got": got, "ok": ok})
    ppl, n_tokens = _perplexity(model, tokenizer, heldout, seq_len)
    del model
    return {
        "accuracy": correct / len(eval_items) if eval_items else None,
        "eval_items": len(eval_items),
        "perplexity": ppl if math.isfinite(ppl) else None,
        "heldout_tokens": n_tokens,
        "answers": answers,
    }


def run_evaluate(req: dict) -> dict:
    """Evaluate each model in `req["models"]` (name -> folder) on the same eval and held-out sets."""
    eval_items = read_jsonl(req["eval"])[: int(req.get("eval_limit", 10**9))] if req.get("eval") else []
    heldout = read_jsonl(req["heldout"]) if req.get("heldout") else []
    out = {}
    for name, path in req["models"].items():
        emit("stage", stage="evaluate", message=f"evaluating {name}: {len(eval_items)} eval prompts, "
             f"{len(heldout)} held-out texts")
        out[name] = evaluate_model(path, eval_items, heldout, int(req.get("seq_len", 512)))
    return out


def run_prompts(req: dict) -> dict:
    """Logits over each prompt's tokens and a greedy completion: the candidate side of `switchyard validate`.

    Prompts arrive as token ids (the driver tokenizes with the base's tokenizer, so both sides see the
    same tokens). Writes `req["out"]`, a safetensors file with `logits_<i>` of shape [tokens_i, vocab]
    in float32, and returns the completions' token ids in prompt order.
    """
    import torch
    from safetensors.torch import save_file

    model, _ = _load_model(req["model"], req.get("dtype", "float32"))
    pad = req.get("pad_token_id")
    tensors, greedy = {}, []
    emit("stage", stage="run", message=f"running {len(req['token_ids'])} prompts on {req['model']}")
    for i, token_ids in enumerate(req["token_ids"]):
        ids = torch.tensor([token_ids])
        with torch.no_grad():
            tensors[f"logits_{i}"] = model(input_ids=ids).logits[0].float().contiguous()
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=int(req["max_new_tokens"]), pad_token_id=pad)
        greedy.append(out[0, ids.shape[1]:].tolist())
    save_file(tensors, req["out"])
    return {"greedy_ids": greedy}


JOBS = {"quantize": run_quantize, "evaluate": run_evaluate, "prompts": run_prompts}


def _die_with_parent() -> None:
    """Linux: get SIGTERM when the driver dies, so a killed `switchyard quantize` leaves no orphan."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main(argv: list[str]) -> int:
    _die_with_parent()
    if len(argv) != 1:
        print("usage: quant_worker.py REQUEST.json", file=sys.stderr)
        return 2
    req = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    job = JOBS.get(req.get("job", ""))
    if job is None:
        emit("error", kind="request", message=f"unknown job {req.get('job')!r}; expected one of {sorted(JOBS)}")
        return EXIT_REPORTED
    try:
        result = job(req)
    except WorkerFailure as exc:
        if exc.__cause__ is not None:  # the library's traceback belongs in the log
            import traceback

            traceback.print_exception(exc.__cause__)
            sys.stderr.flush()
        emit("error", kind=exc.kind, message=exc.message)
        return EXIT_REPORTED
    except MemoryError:
        emit("error", kind="memory", message=f"out of memory (peak {peak_rss_mib():.0f} MiB)")
        return EXIT_REPORTED
    emit("result", job=req["job"], result=result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
