"""`validate`: adapter-on-base vs a merged candidate, on real tiny models with a real tokenizer."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from merger.api import MergeOptions, merge
from merger.validate import RunOutput, compare, validate
from tests.merger.common import make_adapter, tiny_model

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 .,:!?<>|/"


def save_char_tokenizer(path):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    fast.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    fast.save_pretrained(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("val")
    base = tiny_model(root / "base", "llama")
    save_char_tokenizer(base)
    adapter = make_adapter(base, root / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    merged = merge(base, [adapter], root / "merged", MergeOptions(precise=True)).out
    other = make_adapter(base, root / "other", seed=5, r=4, lora_alpha=32, target_modules="all-linear")
    wrong = merge(base, [other], root / "wrong").out
    evalf = root / "eval.jsonl"
    evalf.write_text("\n".join(json.dumps({"prompt": p, "expected": e}) for p, e in
                               [("abc", "cba"), ("hello", "olleh"), ("12 34", "43 21")]))
    return base, adapter, merged, wrong, evalf


def test_merged_passes_and_wrong_candidate_fails(setup):
    base, adapter, merged, wrong, evalf = setup
    good = validate(base, adapter, merged, evalf, max_kl=1e-6, min_agreement=1.0, max_new_tokens=6)
    assert good.passed and good.prompts == 3
    assert good.logits_max_abs_diff < 1e-4 and good.greedy_agreement == 1.0
    assert good.reference_accuracy == good.candidate_accuracy
    bad = validate(base, adapter, wrong, evalf, max_kl=1e-6, min_agreement=1.0, max_new_tokens=6)
    assert not bad.passed and bad.mean_kl > 1e-6 and bad.failures
    assert json.loads(json.dumps(bad.to_dict()))["passed"] is False


def test_candidate_runner_is_pluggable(setup):
    base, adapter, merged, _, evalf = setup
    seen = []

    def runner(prompts, max_new_tokens):
        seen.extend(prompts)
        from merger.validate import HFRunner

        outs = HFRunner(merged, tokenizer_path=base)(prompts, max_new_tokens)
        return [RunOutput(o.logits + 0.5 * torch.randn_like(o.logits), o.greedy_ids, o.text) for o in outs]

    report = validate(base, adapter, merged, evalf, max_kl=1e-6, min_agreement=0.0, max_new_tokens=4,
                      candidate_runner=runner)
    assert seen == ["abc", "hello", "12 34"]
    assert not report.passed and report.logits_max_abs_diff > 0.1


def test_compare_metrics_by_hand():
    ref = [RunOutput(torch.tensor([[0.0, 0.0]]), (1, 2, 3), "x")]
    same = compare(ref, ref, ["x"], max_kl=0.0, min_agreement=1.0)
    assert same.passed and same.mean_kl == 0.0 and same.reference_accuracy == 1.0
    cand = [RunOutput(torch.tensor([[0.0, 1.0]]), (1, 2, 4), "y")]
    r = compare(ref, cand, ["x"], max_kl=1.0, min_agreement=0.5)
    p = torch.tensor([0.5, 0.5])
    q = torch.softmax(torch.tensor([0.0, 1.0]), 0)
    assert r.mean_kl == pytest.approx(float((p * (p / q).log()).sum()))
    assert r.greedy_agreement == pytest.approx(2 / 3) and r.candidate_accuracy == 0.0 and r.passed


def test_cli_exit_codes_and_json(setup):
    base, adapter, merged, wrong, evalf = setup
    cmd = [sys.executable, "-m", "switchyard.cli", "validate", str(base), str(adapter)]
    ok = subprocess.run(cmd + [str(merged), "--eval", str(evalf), "--json", "--max-new-tokens", "4"],
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["passed"] is True
    assert json.loads((merged / "switchyard.json").read_text())["validation"]["passed"] is True
    bad = subprocess.run(cmd + [str(wrong), "--eval", str(evalf), "--max-kl", "1e-6", "--max-new-tokens", "4"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and bad.stdout.startswith("FAIL")
