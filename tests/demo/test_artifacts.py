"""The real demo build (`artifacts/demo`, built by the session fixture if missing): contract and accuracy.

In-process (transformers/PEFT) checks; the served-by-vLLM accuracy belongs to the engine tests.
"""

from __future__ import annotations

import json

import pytest

from demo.build import load_base
from demo.evaluate import exact_match, generate_greedy, read_eval
from switchyard.config import load_config

pytestmark = pytest.mark.slow  # builds the demo first when it is missing (minutes)


def test_report_meets_the_bar(demo_dir):
    report = json.loads((demo_dir / "report.json").read_text())
    for score in report["scores"]:
        assert score["adapter_acc"] >= 0.9, score
        assert score["base"] <= 0.1, score
    assert report["parameters"] > 100_000


def test_eval_sets_are_held_out_on_disk(demo_dir):
    config = load_config(demo_dir / "switchyard.toml")
    for adapter in config.adapters:
        task = adapter.path.name
        held_out = read_eval(adapter.eval)
        train = {i.prompt for i in read_eval(demo_dir / "train" / f"{task}.jsonl")}
        assert len(held_out) == 100 and len(train) >= 1000
        assert not train & {i.prompt for i in held_out}


def test_base_and_adapters_answer_and_adapters_change_the_output(demo_dir):
    from peft import PeftModel

    config = load_config(demo_dir / "switchyard.toml")
    base, tok = load_base(config.base.model)
    for adapter in config.adapters:
        items = read_eval(adapter.eval)[:20]
        prompts = [i.prompt for i in items]
        expected = [i.expected for i in items]
        base_out = generate_greedy(base, tok, prompts)
        assert len(base_out) == len(prompts)  # the base may answer "" (it never saw these tasks)
        wrapped = PeftModel.from_pretrained(base, adapter.path, autocast_adapter_dtype=False).eval()
        adapter_out = generate_greedy(wrapped, tok, prompts)
        base = wrapped.unload()
        assert all(o.strip() for o in adapter_out)
        assert sum(a != b for a, b in zip(adapter_out, base_out)) >= 15
        assert exact_match(adapter_out, expected) >= 0.9 > exact_match(base_out, expected) + 0.5
