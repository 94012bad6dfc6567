"""The build pipeline end to end with a tiny, fast recipe (the layout and caching; not the accuracy)."""

from __future__ import annotations

import dataclasses
import json

import pytest

pytestmark = pytest.mark.slow  # trains a tiny model: ~10 s alone, longer on a busy machine

from demo.build import ensure_demo, is_up_to_date
from demo.evaluate import read_eval
from demo.recipe import Recipe, recipe_hash
from switchyard.config import load_config

TINY = dataclasses.replace(
    Recipe(), tokenizer_corpus=600, vocab_size=384, hidden_size=128, intermediate_size=128, num_layers=1,
    num_heads=2, num_kv_heads=2, pretrain_steps=2, pretrain_batch=4, n_train=16, n_eval=6, lora_steps=2,
    lora_batch=4, max_new_tokens=4,
)


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    lines: list[str] = []
    parent = tmp_path_factory.mktemp("d")
    (parent / "demo.tmp-99999999" / "base").mkdir(parents=True)  # left over from a killed build
    root = ensure_demo(parent / "demo", recipe=TINY, progress=lines.append)
    return root, lines


def test_layout_and_contract(tiny_demo):
    root, lines = tiny_demo
    assert any("pretraining" in line for line in lines)
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json"):
        assert (root / "base" / name).is_file(), name
    config = json.loads((root / "base" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["vocab_size"] % 64 == 0
    assert "chat_template" in json.loads((root / "base" / "tokenizer_config.json").read_text())
    for task in TINY.tasks:
        adapter = json.loads((root / "adapters" / task / "adapter_config.json").read_text())
        assert adapter["r"] == 8
        assert set(adapter["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                  "up_proj", "down_proj"}
        assert (root / "adapters" / task / "adapter_model.safetensors").is_file()
        train = {i.prompt for i in read_eval(root / "train" / f"{task}.jsonl")}
        held_out = {i.prompt for i in read_eval(root / "eval" / f"{task}.jsonl")}
        assert len(train) == TINY.n_train and len(held_out) == TINY.n_eval and not train & held_out
    deployment = load_config(root / "switchyard.toml")
    assert deployment.base.model == (root / "base").resolve()
    assert {a.name for a in deployment.adapters} == {"demo-reverse", "demo-sort"}
    assert all(a.path.is_dir() and a.eval.is_file() for a in deployment.adapters)


def test_report_and_cache_key(tiny_demo):
    root, _ = tiny_demo
    report = json.loads((root / "report.json").read_text())
    assert report["recipe_sha"] == recipe_hash(TINY) == (root / "recipe.sha").read_text().strip()
    assert [s["task"] for s in report["scores"]] == list(TINY.tasks)
    assert all(0.0 <= s["base"] <= 1.0 and 0.0 <= s["adapter_acc"] <= 1.0 for s in report["scores"])
    assert "| reverse | demo-reverse |" in (root / "report.md").read_text()
    assert is_up_to_date(root, TINY) and not is_up_to_date(root, Recipe())
    assert not list(root.parent.glob("demo.tmp-*")) and not list(root.parent.glob(".demo.old-*"))


def test_up_to_date_build_is_a_no_op(tiny_demo):
    root, _ = tiny_demo
    stamp = (root / "base" / "model.safetensors").stat().st_mtime_ns
    lines: list[str] = []
    assert ensure_demo(root, recipe=TINY, progress=lines.append) == root
    assert lines == [] and (root / "base" / "model.safetensors").stat().st_mtime_ns == stamp
