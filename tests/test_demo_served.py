"""The demo as vLLM serves it (one shared engine): the base and each adapter answer, the adapters change
the output, and each adapter beats the base on its own held-out eval set."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from demo.evaluate import chat_messages, exact_match, read_eval

pytestmark = pytest.mark.engine


def answers(url: str, model: str, items) -> list[str]:
    with httpx.Client(timeout=120) as client:
        def ask(item):
            r = client.post(f"{url}/v1/chat/completions", json={
                "model": model, "messages": chat_messages(item), "max_tokens": 32, "temperature": 0})
            r.raise_for_status()
            return r.json()["choices"][0]["message"]["content"]

        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(ask, items))


def test_each_adapter_beats_the_base_on_its_task_as_served(base_engine, demo_config):
    for adapter in demo_config.adapters:
        items = read_eval(adapter.eval)[:60]
        expected = [i.expected for i in items]
        base_out = answers(base_engine.url, demo_config.base.name, items)
        adapter_out = answers(base_engine.url, adapter.name, items)
        base_acc, adapter_acc = exact_match(base_out, expected), exact_match(adapter_out, expected)
        assert adapter_acc >= 0.9, (adapter.name, adapter_acc, adapter_out[:3])
        assert base_acc <= 0.1, (adapter.name, base_acc)
        assert sum(a != b for a, b in zip(adapter_out, base_out)) >= 0.9 * len(items)


def test_base_answers_completions_and_adapters_differ_from_each_other(base_engine, demo_config):
    r = httpx.post(f"{base_engine.url}/v1/completions", timeout=60, json={
        "model": demo_config.base.name, "prompt": "the red fox", "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"]
    item = read_eval(demo_config.adapters[0].eval)[0]
    outs = {a.name: answers(base_engine.url, a.name, [item])[0] for a in demo_config.adapters}
    assert len(set(outs.values())) == len(outs), outs
