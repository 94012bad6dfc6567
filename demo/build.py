"""`switchyard demo build`: train the demo base and adapters and write them under `artifacts/demo/`.

Layout of the result (all paths relative to the demo folder):

    base/                    LlamaForCausalLM checkpoint (bf16 safetensors) + tokenizer + chat template
    adapters/<task>/         PEFT LoRA, rank 8, on q,k,v,o,gate,up,down
    train/<task>.jsonl       the training examples (also the quantizer's calibration prompts)
    eval/<task>.jsonl        held-out eval set, {"prompt", "expected"} per line
    switchyard.toml          the deployment config (`switchyard.config.load_config`)
    report.json, report.md   base vs adapter exact-match accuracy, parameter count, build seconds
    recipe.sha               the recipe hash this folder was built from (the cache key)

The build writes into `<root>.tmp-<pid>` beside the target and renames it into place only when
complete; a lock file serialises concurrent builders, which then find the demo up to date.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterator

from demo.evaluate import EvalItem, generate_greedy, exact_match, write_eval
from demo.recipe import Recipe, recipe_hash
from demo.report import BuildReport, TaskScore, render_markdown
from demo.tasks import echo_example, split_task
from demo.toml import deployment_toml
from switchyard.files import replace_dir

DEFAULT_ROOT = Path("artifacts/demo")
BASE_NAME = "demo-base"

Progress = Callable[[str], None]


def adapter_name(task: str) -> str:
    """The stable name clients call an adapter by."""
    return f"demo-{task}"


def is_up_to_date(root: Path, recipe: Recipe = Recipe()) -> bool:
    sha = root / "recipe.sha"
    return sha.is_file() and sha.read_text().strip() == recipe_hash(recipe)


@contextmanager
def _build_lock(root: Path) -> Iterator[None]:
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second builder waits here, then finds the demo up to date
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_demo(root: Path = DEFAULT_ROOT, *, force: bool = False, recipe: Recipe = Recipe(),
                progress: Progress = lambda line: None) -> Path:
    """The demo folder at `root`, built first if missing, stale (recipe changed) or `force`d."""
    root = Path(root)
    with _build_lock(root):
        if not force and is_up_to_date(root, recipe):
            return root
        build_demo(root, recipe, progress)
    return root


def build_demo(root: Path, recipe: Recipe, progress: Progress) -> BuildReport:
    """Build everything into a temporary folder beside `root`, then swap it into place."""
    # only the lock holder builds, so any other temporary folder is left over from a killed build
    for stale in [*root.parent.glob(f"{root.name}.tmp-*"), *root.parent.glob(f".{root.name}.old-*"),
                  *root.parent.glob(f"{root.name}.old-*")]:  # the last: left by builds before replace_dir
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root.parent / f"{root.name}.tmp-{os.getpid()}"
    tmp.mkdir(parents=True)
    try:
        report = _build_into(tmp, recipe, progress)
        replace_dir(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _build_into(out: Path, recipe: Recipe, progress: Progress) -> BuildReport:
    import torch

    from demo.tokenizer import train_tokenizer
    from demo.train import build_model, corpus_texts, pretrain, train_lora

    started = time.monotonic()
    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    dtype = getattr(torch, recipe.dtype)

    progress("tokenizer: training byte-level BPE")
    tok = train_tokenizer(corpus_texts(recipe.seed, recipe.tokenizer_corpus), recipe.vocab_size)
    vocab = -(-len(tok) // 64) * 64

    progress(f"base: pretraining ({recipe.pretrain_steps} steps)")
    model = build_model(recipe, vocab, tok)
    n_params = sum(p.numel() for p in model.parameters())
    echo_probe = [echo_example(rng) for rng in [random.Random(f"echo-probe-{recipe.seed}")] for _ in range(100)]

    def probe(step: int) -> None:
        outputs = generate_greedy(model, tok, [e.prompt for e in echo_probe], recipe.max_new_tokens)
        progress(f"  base: step {step}: copies {exact_match(outputs, [e.answer for e in echo_probe]):.0%} of echo prompts")

    pretrain(model, tok, recipe, progress, probe)
    # adapters are trained against the weights as saved (rounded to the serving dtype)
    model = model.to(dtype).to(torch.float32)
    _save_base(model, tok, out / "base", dtype)

    splits = {task: split_task(task, recipe.seed, recipe.n_train, recipe.n_eval) for task in recipe.tasks}
    for task, split in splits.items():
        write_eval(out / "eval" / f"{task}.jsonl", (EvalItem(e.prompt, e.answer) for e in split.eval))
        write_eval(out / "train" / f"{task}.jsonl", (EvalItem(e.prompt, e.answer) for e in split.train))
        progress(f"adapter {task}: training LoRA ({recipe.lora_steps} steps)")
        torch.manual_seed(recipe.seed)
        peft_model = train_lora(model, tok, task, split.train, recipe, progress)
        peft_model.to(dtype).save_pretrained(out / "adapters" / task)
        model = peft_model.unload().to(torch.float32)

    progress("evaluating base and adapters (greedy, in-process, as saved)")
    scores = score_saved(out, recipe)
    report = BuildReport(
        recipe_sha=recipe_hash(recipe),
        parameters=n_params,
        vocab_size=vocab,
        dtype=recipe.dtype,
        scores=tuple(scores),
        build_seconds=round(time.monotonic() - started, 1),
        recipe=asdict(recipe),
    )
    (out / "switchyard.toml").write_text(
        deployment_toml(BASE_NAME, {adapter_name(t): t for t in recipe.tasks}, report.recipe_sha)
    )
    (out / "report.json").write_text(json.dumps(report.to_json(), indent=2) + "\n")
    (out / "report.md").write_text(render_markdown(report))
    (out / "recipe.sha").write_text(report.recipe_sha + "\n")
    return report


def _save_base(model, tok, path: Path, dtype) -> None:
    from transformers import GenerationConfig

    model.to(dtype).save_pretrained(path, safe_serialization=True)
    model.to(dtype=model.dtype)
    GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        do_sample=False,
    ).save_pretrained(path)
    tok.save_pretrained(path)
    # keep the template inside tokenizer_config.json too, for loaders that ignore chat_template.jinja
    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = tok.chat_template
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def load_base(path: Path, dtype: str = "bfloat16"):
    """(model, tokenizer) of a saved demo base, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    return model, tok


def score_saved(root: Path, recipe: Recipe) -> list[TaskScore]:
    """Exact-match accuracy of the saved base and of each saved adapter on every task's eval set."""
    from peft import PeftModel

    from demo.evaluate import read_eval

    base, tok = load_base(root / "base", recipe.dtype)
    evals = {task: read_eval(root / "eval" / f"{task}.jsonl") for task in recipe.tasks}

    def accuracy(model, items: list[EvalItem]) -> float:
        outputs = generate_greedy(model, tok, [i.prompt for i in items], recipe.max_new_tokens)
        return exact_match(outputs, [i.expected for i in items])

    base_acc = {task: accuracy(base, items) for task, items in evals.items()}
    scores = []
    for task in recipe.tasks:
        wrapped = PeftModel.from_pretrained(base, root / "adapters" / task, autocast_adapter_dtype=False)
        scores.append(TaskScore(task=task, adapter=adapter_name(task), n=len(evals[task]),
                                base=base_acc[task], adapter_acc=accuracy(wrapped.eval(), evals[task])))
        base = wrapped.unload()
    return scores
