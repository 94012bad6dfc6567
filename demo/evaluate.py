"""Exact-match scoring and eval sets: shared by the demo build, the engine tests and the promote gate.

An eval set is a jsonl file, one `{"prompt": "<user message>", "expected": "<exact answer>"}` per line.
A prediction is correct when `prediction.strip() == expected.strip()`; accuracy is in [0, 1].
This module is pure apart from `read_eval`/`write_eval` (files); `generate_greedy` runs a local model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from demo.errors import DemoError


@dataclass(frozen=True)
class EvalItem:
    prompt: str  # the user message
    expected: str  # the exact answer


def is_correct(output: str, expected: str) -> bool:
    return output.strip() == expected.strip()


def exact_match(outputs: Sequence[str], expected: Sequence[str]) -> float:
    """The fraction of outputs equal to their expected answer after `.strip()`; 0.0 for no items."""
    if len(outputs) != len(expected):
        raise DemoError(
            f"exact_match got {len(outputs)} outputs for {len(expected)} expected answers",
            "score one output per eval item, in order",
        )
    if not expected:
        return 0.0
    return sum(is_correct(o, e) for o, e in zip(outputs, expected)) / len(expected)


def parse_eval_line(line: str, where: str) -> EvalItem:
    try:
        raw = json.loads(line)
        return EvalItem(prompt=str(raw["prompt"]), expected=str(raw["expected"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise DemoError(
            f"{where} is not an eval line ({exc.__class__.__name__}: {exc})",
            'each line must be {"prompt": ..., "expected": ...}',
        ) from None


def read_eval(path: Path | str) -> list[EvalItem]:
    """All items of an eval jsonl file (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise DemoError(f"eval set {path} does not exist", "run `switchyard demo build` (or fix the path)")
    items = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            items.append(parse_eval_line(line, f"{path}:{n}"))
    return items


def eval_lines(items: Iterable[EvalItem]) -> str:
    return "".join(json.dumps({"prompt": i.prompt, "expected": i.expected}) + "\n" for i in items)


def write_eval(path: Path, items: Iterable[EvalItem]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(eval_lines(items))


def chat_messages(item: EvalItem) -> list[dict[str, str]]:
    """The OpenAI `messages` for one eval item (what a client sends to /v1/chat/completions)."""
    return [{"role": "user", "content": item.prompt}]


def generate_greedy(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 32,
                    batch_size: int = 128) -> list[str]:
    """Greedy replies of a local HF/PEFT model to user messages, rendered with the chat template.

    Left-pads each batch; stops at eos; returns the decoded replies without special tokens.
    """
    import torch

    outputs: list[str] = []
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            texts = [
                tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                              tokenize=False)
                for p in chunk
            ]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.inference_mode():
                out = model.generate(
                    **enc, max_new_tokens=max_new_tokens, do_sample=False,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                )
            new = out[:, enc["input_ids"].shape[1]:]
            outputs += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = old_side
    return outputs
