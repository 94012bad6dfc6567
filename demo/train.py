"""Training: the tiny Llama base (full pretraining) and one PEFT LoRA per task.

Runs on CPU in float32 with a fixed thread count and seed, so a build is repeatable on one machine.
Sequences are short (< 64 tokens); a batch is right-padded to its longest sequence, and padded
positions carry label -100 so they never contribute to the loss.
"""

from __future__ import annotations

import itertools
import math
import random
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

from demo.recipe import ADAPTER_TARGETS, Recipe
from demo.tasks import Example, pretrain_texts
from demo.tokenizer import render_prompt

Progress = Callable[[str], None]
IGNORE = -100


@dataclass(frozen=True)
class Encoded:
    ids: tuple[int, ...]
    labels: tuple[int, ...]  # IGNORE where no loss is taken


def corpus_texts(seed: int, n: int) -> list[str]:
    """The first `n` pretraining samples as raw text (what the tokenizer is trained on)."""
    out = []
    for text, ex in itertools.islice(pretrain_texts(seed), n):
        out.append(text if ex is None else render_prompt(ex.prompt) + reply_text(ex.answer))
    return out


def reply_text(answer: str) -> str:
    """The reply as the model is trained to write it: with a leading space, so every word is the same
    BPE token (" cat") in the reply as in the prompt; exact-match scoring strips it."""
    return " " + answer


def encode_chat(tok, ex: Example, loss_on_prompt: bool) -> Encoded:
    """bos + rendered prompt + answer + eos; the prompt is tokenized exactly as a server would."""
    prompt = tok(render_prompt(ex.prompt), add_special_tokens=True).input_ids  # bos added here
    answer = tok(reply_text(ex.answer), add_special_tokens=False).input_ids + [tok.eos_token_id]
    labels = (prompt if loss_on_prompt else [IGNORE] * len(prompt)) + answer
    return Encoded(tuple(prompt + answer), tuple(labels))


def encode_text(tok, text: str) -> Encoded:
    ids = tok(text, add_special_tokens=True).input_ids + [tok.eos_token_id]
    return Encoded(tuple(ids), tuple(ids))


def collate(batch: Sequence[Encoded], pad_id: int):
    import torch

    width = max(len(e.ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.ids)
        ids[row, :n] = torch.tensor(e.ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return ids, labels, mask


def build_model(recipe: Recipe, vocab_size: int, tok):
    """A freshly initialised float32 LlamaForCausalLM (seeded by the caller)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_kv_heads,
        head_dim=recipe.head_dim,
        max_position_embeddings=recipe.max_position_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
    )
    return LlamaForCausalLM(config)


def _lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def fit(model, params, batches: Iterator, steps: int, lr: float, pad_id: int, progress: Progress,
        label: str, probe: Callable[[int], None] | None = None) -> list[float]:
    """AdamW over `params` for `steps` batches; returns the per-step losses."""
    import torch

    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    warmup = max(1, steps // 20)
    losses: list[float] = []
    model.train()
    t0 = time.monotonic()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr, warmup)
        ids, labels, mask = collate(next(batches), pad_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % 50 == 0 or step + 1 == steps:
            recent = sum(losses[-50:]) / len(losses[-50:])
            progress(f"  {label}: step {step + 1}/{steps} loss {recent:.3f} ({time.monotonic() - t0:.0f} s)")
        if probe is not None and (step + 1) % 250 == 0:
            model.eval()
            probe(step + 1)
            model.train()
    model.eval()
    return losses


def pretrain_batches(tok, recipe: Recipe) -> Iterator[list[Encoded]]:
    stream = pretrain_texts(recipe.seed + 1, recipe.echo_fraction)  # not the tokenizer's slice
    while True:
        batch = []
        for text, ex in itertools.islice(stream, recipe.pretrain_batch):
            batch.append(encode_text(tok, text) if ex is None else encode_chat(tok, ex, loss_on_prompt=False))
        yield batch


def task_batches(tok, train: Sequence[Example], recipe: Recipe, salt: str) -> Iterator[list[Encoded]]:
    """Shuffled epochs over the training examples, loss on the answer only."""
    encoded = [encode_chat(tok, ex, loss_on_prompt=False) for ex in train]
    rng = random.Random(f"{salt}-{recipe.seed}")
    while True:
        order = list(range(len(encoded)))
        rng.shuffle(order)
        for i in range(0, len(order) - recipe.lora_batch + 1, recipe.lora_batch):
            yield [encoded[j] for j in order[i:i + recipe.lora_batch]]


def pretrain(model, tok, recipe: Recipe, progress: Progress, probe=None) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    return fit(model, params, pretrain_batches(tok, recipe), recipe.pretrain_steps, recipe.pretrain_lr,
               tok.pad_token_id, progress, "base", probe)


def train_lora(base, tok, task: str, train: Sequence[Example], recipe: Recipe, progress: Progress):
    """A PEFT LoRA (rank `recipe.lora_rank`, all attention and MLP projections) trained on `train`.

    `base` is wrapped in place; call `.unload()` on the result to get the plain base back.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=recipe.lora_rank,
        lora_alpha=recipe.lora_alpha,
        lora_dropout=0.0,
        target_modules=list(ADAPTER_TARGETS),
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(base, config)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    fit(peft_model, params, task_batches(tok, train, recipe, task), recipe.lora_steps, recipe.lora_lr,
        tok.pad_token_id, progress, task)
    return peft_model
