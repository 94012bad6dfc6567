"""Load levels, prompt sources and the interleaved batch plan."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from loadtests.errors import WorkloadError
from loadtests.workload import arrival_offsets, parse_levels, plan, read_prompts, split_evenly, synthetic_prompts


def test_parse_levels():
    assert [l.label for l in parse_levels("1,4,16", None, False)] == ["concurrency=1", "concurrency=4", "concurrency=16"]
    assert [l.label for l in parse_levels(None, "2,0.5", True)] == ["rate=2/s poisson", "rate=0.5/s poisson"]
    assert parse_levels(None, None, False)[0].concurrency == 1
    for bad in (("1,x", None), ("0", None), ("1.5", None), ("2,2", None), ("1", "2")):
        with pytest.raises(WorkloadError):
            parse_levels(*bad, False)


def test_read_prompts(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "hi", "expected": "x"}) + "\n\n" + json.dumps({"prompt": "yo"}) + "\n")
    assert read_prompts(f) == ["hi", "yo"]
    f.write_text('{"prompt": "ok"}\n{"text": "no"}\n')
    with pytest.raises(WorkloadError, match=r"p.jsonl:2"):
        read_prompts(f)
    with pytest.raises(WorkloadError, match="cannot read"):
        read_prompts(tmp_path / "missing.jsonl")


def test_synthetic_prompts_are_seeded_and_sized():
    a = synthetic_prompts(5, 40, seed=1)
    assert a == synthetic_prompts(5, 40, seed=1) != synthetic_prompts(5, 40, seed=2)
    assert all(len(p.split()) == 40 for p in a)
    assert all(len(p.split()) == 20 for p in synthetic_prompts(2, 40, seed=1, tokens_per_word=2.0))


def test_arrivals_uniform_and_poisson():
    assert arrival_offsets(4.0, False, 0, count=4) == (0.0, 0.25, 0.5, 0.75)
    p = arrival_offsets(10.0, True, 3, count=5000)
    gaps = [b - a for a, b in zip(p, p[1:])]
    assert sum(gaps) / len(gaps) == pytest.approx(0.1, rel=0.05)
    assert p == arrival_offsets(10.0, True, 3, count=5000)
    assert max(arrival_offsets(2.0, False, 0, horizon_s=3.0)) < 3.0


def test_split_evenly():
    assert split_evenly(10, 4) == [3, 3, 2, 2] and sum(split_evenly(7, 3)) == 7


def test_plan_interleaves_rotates_and_shares_prompts():
    levels = parse_levels("1,4", None, False)
    prompts = [f"p{i}" for i in range(10)]
    batches = plan(["A", "B"], levels, prompts, requests=6, duration_s=None, rounds=3, warmup=2, seed=0)
    first_level = [b for b in batches if b.level == levels[0]]
    assert [(b.target, b.batch) for b in first_level] == [
        ("A", -1), ("B", -1), ("A", 0), ("B", 0), ("B", 1), ("A", 1), ("A", 2), ("B", 2)]
    counts = Counter((b.target, b.level.label) for b in batches if not b.warmup for _ in range(b.count))
    assert set(counts.values()) == {6}
    a0, b0 = first_level[2], first_level[3]
    assert a0.prompts == b0.prompts and a0.prompts[0] != first_level[0].prompts[0]  # warm-up uses others
    assert batches[-1].level == levels[1]


def test_plan_rate_and_duration():
    levels = parse_levels(None, "5", False)
    batches = plan(["A"], levels, ["x"], requests=None, duration_s=2.0, rounds=2, warmup=0, seed=0)
    assert len(batches) == 2 and batches[0].time_budget_s == 1.0
    assert batches[0].arrivals == (0.0, 0.2, 0.4, 0.6, 0.8)
    with pytest.raises(WorkloadError):
        plan(["A"], levels, ["x"], requests=3, duration_s=2.0, rounds=2, warmup=0, seed=0)


def test_levels_use_fresh_prompts_when_the_pool_allows():
    levels = parse_levels("1,2", None, False)
    prompts = [f"p{i}" for i in range(2 * (1 + 4))]
    batches = plan(["A"], levels, prompts, requests=4, duration_s=None, rounds=2, warmup=1, seed=0)
    used = {lv.label: set() for lv in levels}
    for b in batches:
        used[b.level.label].update(b.prompts[: (b.count or 0)])
    assert used["concurrency=1"].isdisjoint(used["concurrency=2"])
    assert len(used["concurrency=1"]) == 5


def test_rounds_shrink_so_batches_reach_the_concurrency():
    levels = parse_levels("1,16", None, False)
    batches = plan(["A"], levels, ["x"], requests=32, duration_s=None, rounds=4, warmup=0, seed=0)
    per_level = Counter(b.level.label for b in batches)
    assert per_level == {"concurrency=1": 4, "concurrency=16": 2}
    assert all(b.count >= 16 for b in batches if b.level.concurrency == 16)
