"""Compare a merged candidate with adapter-on-base (PEFT, unmerged, in process) on the same prompts.

The candidate side is pluggable: any `Runner` (prompts -> per-prompt logits over the prompt tokens
plus greedy completions) can stand in for the merged model, e.g. a compressed-tensors checkpoint run
in another virtualenv. Metrics (pure, `compare`): per-token logits max-abs difference, mean KL
(reference || candidate) over the prompt positions, greedy-token agreement of the completions, and
exact-match accuracy of each side on the eval set.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Protocol, Sequence

from merger.errors import ValidationError


@dataclass(frozen=True)
class RunOutput:
    """One prompt's result: `logits` (tokens, vocab) float32 over the prompt's tokens as fed to the
    model (same tokenization on both sides), and the greedy completion's token ids and text."""

    logits: object  # torch.Tensor
    greedy_ids: tuple[int, ...]
    text: str


class Runner(Protocol):
    def __call__(self, prompts: Sequence[str], max_new_tokens: int) -> list[RunOutput]: ...


@dataclass(frozen=True)
class ValidationReport:
    prompts: int
    logits_max_abs_diff: float
    mean_kl: float
    greedy_agreement: float  # share of greedy tokens equal, position by position
    reference_accuracy: Optional[float]
    candidate_accuracy: Optional[float]
    max_kl: float
    min_agreement: float
    passed: bool
    failures: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return asdict(self)


def load_eval(path: Path) -> list[dict]:
    try:
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as exc:
        raise ValidationError(f"cannot read eval file {path}: {exc}", 'use JSONL lines {"prompt": ..., "expected": ...}')
    if not rows or any("prompt" not in r for r in rows):
        raise ValidationError(f"eval file {path} has no rows with a 'prompt'", 'use {"prompt": ..., "expected": ...}')
    return rows


def compare(reference: list[RunOutput], candidate: list[RunOutput], expected: Optional[list[str]],
            max_kl: float, min_agreement: float) -> ValidationReport:
    import torch

    max_abs, kls, agree, total = 0.0, [], 0, 0
    for ref, cand in zip(reference, candidate, strict=True):
        r, c = torch.as_tensor(ref.logits).double(), torch.as_tensor(cand.logits).double()
        if r.shape != c.shape:
            raise ValidationError(f"logits shapes differ ({tuple(r.shape)} vs {tuple(c.shape)})",
                                  "the candidate must use the base's tokenizer and vocabulary")
        max_abs = max(max_abs, (r - c).abs().max().item() if r.numel() else 0.0)
        lp, lq = torch.log_softmax(r, -1), torch.log_softmax(c, -1)
        kls.extend((lp.exp() * (lp - lq)).sum(-1).tolist())
        n = max(len(ref.greedy_ids), len(cand.greedy_ids))
        agree += sum(a == b for a, b in zip(ref.greedy_ids, cand.greedy_ids))
        total += n
    mean_kl = sum(kls) / len(kls) if kls else 0.0
    agreement = agree / total if total else 1.0

    def accuracy(outs):
        if not expected:
            return None
        return sum(o.text.strip() == e.strip() for o, e in zip(outs, expected)) / len(expected)

    failures = []
    if not math.isfinite(mean_kl) or mean_kl > max_kl:
        failures.append(f"mean KL {mean_kl:.3g} > {max_kl:g}")
    if agreement < min_agreement:
        failures.append(f"greedy agreement {agreement:.3f} < {min_agreement:g}")
    return ValidationReport(len(reference), max_abs, mean_kl, agreement, accuracy(reference), accuracy(candidate),
                            max_kl, min_agreement, not failures, tuple(failures))


class HFRunner:
    """Runs a transformers model (optionally with a PEFT adapter on top, unmerged) on chat prompts."""

    def __init__(self, model_path: Path, adapter: Optional[Path] = None, tokenizer_path: Optional[Path] = None,
                 dtype: str = "float32") -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or model_path)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype))
        if adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter)
        self.model = model.eval()

    def encode(self, prompt: str) -> list[int]:
        return encode_prompt(self.tokenizer, prompt)

    def __call__(self, prompts: Sequence[str], max_new_tokens: int) -> list[RunOutput]:
        import torch

        outs = []
        for prompt in prompts:
            ids = torch.tensor([self.encode(prompt)])
            with torch.no_grad():
                logits = self.model(input_ids=ids).logits[0].float()
                gen = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                          max_new_tokens=max_new_tokens,
                                          pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
            new = gen[0, ids.shape[1]:].tolist()
            outs.append(RunOutput(logits, tuple(new), self.tokenizer.decode(new, skip_special_tokens=True)))
        return outs


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """The chat template when the tokenizer has one (as the served model sees it), else plain text."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return tokenizer(prompt)["input_ids"]


def validate(base: Path, adapter: Path, candidate: Path, eval_file: Optional[Path] = None, max_kl: float = 0.01,
             min_agreement: float = 0.95, *, prompts: Optional[Sequence[str]] = None, max_new_tokens: int = 16,
             candidate_runner: Optional[Runner] = None) -> ValidationReport:
    """Adapter-on-base vs the candidate. `candidate_runner` replaces the default transformers runner
    of `candidate` (e.g. a quantized-checkpoint runner); it must use the base's tokenizer."""
    rows = load_eval(eval_file) if eval_file else [{"prompt": p} for p in (prompts or ["Hello"])]
    texts = [r["prompt"] for r in rows]
    expected = [r["expected"] for r in rows] if all("expected" in r for r in rows) else None
    tok_path = base if (Path(base) / "tokenizer_config.json").exists() else candidate
    reference = HFRunner(Path(base), adapter=Path(adapter), tokenizer_path=Path(tok_path))(texts, max_new_tokens)
    runner = candidate_runner or HFRunner(Path(candidate), tokenizer_path=Path(tok_path))
    return compare(reference, runner(texts, max_new_tokens), expected, max_kl, min_agreement)


def record_validation(candidate: Path, report: ValidationReport) -> None:
    """Add the report to the candidate's switchyard.json (atomically), when it has one."""
    prov_file = Path(candidate) / "switchyard.json"
    if not prov_file.exists():
        return
    prov = json.loads(prov_file.read_text())
    prov["validation"] = report.to_dict()
    tmp = prov_file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(prov, indent=2))
    tmp.replace(prov_file)
