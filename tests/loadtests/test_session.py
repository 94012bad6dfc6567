"""The whole pipeline (pre-flight, run, report.json, report.md, plots) against the fake upstream."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from loadtests.errors import TargetError, WorkloadError
from loadtests.session import LoadTestOptions, execute, parse_slo, parse_targets
from loadtests.workload import parse_levels
from tests.loadtests.fake_upstream import FakeOpenAI

VLLM_FIELDS = [
    "duration", "completed", "failed", "total_input_tokens", "total_output_tokens", "request_throughput",
    "request_goodput", "output_throughput", "total_token_throughput", "input_lens", "output_lens", "ttfts",
    "itls", "latencies", "start_times", "errors",
] + [f"{s}_{m}_ms" for m in ("ttft", "tpot", "itl", "e2el") for s in ("mean", "median", "std", "p50", "p90", "p99")]


def test_parse_targets_and_slo():
    t = parse_targets(["a", "b@http://other:1/v1"], "http://h:8000")
    assert [(x.label, x.url, x.model) for x in t] == [("a", "http://h:8000", "a"), ("b", "http://other:1", "b")]
    same = parse_targets(["m@http://x:1", "m@http://y:2"], None)
    assert [x.label for x in same] == ["m@x:1", "m@y:2"]
    with pytest.raises(WorkloadError, match="no URL"):
        parse_targets(["a"], None)
    assert parse_slo("ttft=500ms, tpot=0.05s,e2el=2000") == {"ttft": 500.0, "tpot": 50.0, "e2el": 2000.0}
    for bad in ("itl=5ms", "ttft", "ttft=fast", "ttft=-1"):
        with pytest.raises(WorkloadError):
            parse_slo(bad)


def opts(tmp_path, **kw):
    base = dict(targets=parse_targets(["a", "b"], "http://fake"), levels=tuple(parse_levels("1,2", None, False)),
                out=tmp_path / "rep", requests=4, rounds=2, warmup=1, input_len=16, output_len=4,
                slo_ms={"ttft": 1000.0}, resamples=200)
    base.update(kw)
    return LoadTestOptions(**base)


def test_execute_writes_a_complete_report(tmp_path):
    fake = FakeOpenAI(delays={"a": (0.005, 0.002), "b": (0.005, 0.004)})
    outcome = execute(opts(tmp_path), Console(file=open("/dev/null", "w")), transport=fake.transport())
    out = outcome.out
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "itl.png", "latency_cdf.png", "report.json", "report.md", "requests.jsonl",
        "throughput.png", "ttft.png"]
    assert not list(tmp_path.glob(".rep.tmp-*"))
    report = json.loads((out / "report.json").read_text())
    assert not report["interrupted"] and report["config"]["max_tokens"] == 4 and report["config"]["ignore_eos"]
    assert [l["label"] for l in report["levels"]] == ["concurrency=1", "concurrency=2"]
    for level in report["levels"]:
        for t in ("a", "b"):
            r = level["results"][t]
            assert set(VLLM_FIELDS) <= set(r)
            assert r["completed"] == 4 and r["total_output_tokens"] == 16 and len(r["itls"]) == 4
        assert level["comparisons"]["b"]["mean_itl_ms"]["ratio"] > 1.5
    assert len(report["requests"]) == 2 * 2 * (4 + 1) and len(report["batches"]) == 2 * 2 * (2 + 1)
    raw = [json.loads(l) for l in (out / "requests.jsonl").read_text().splitlines()]
    assert len([r for r in raw if r["kind"] == "request"]) == 20
    md = (out / "report.md").read_text()
    assert "## concurrency=2" in md and "**b / a**" in md and "| output_throughput |" in md
    # the synthetic prompts were sized on the probe: 16 tokens with the fake's 1 token per word
    assert {len(b["prompt"].split()) for b in fake.bodies[2:]} == {16}


def test_execute_unknown_model_writes_nothing(tmp_path):
    with pytest.raises(TargetError, match="'b' is not served"):
        execute(opts(tmp_path), Console(file=open("/dev/null", "w")), transport=FakeOpenAI(models=("a",)).transport())
    assert list(tmp_path.iterdir()) == []


def test_single_model_rate_levels(tmp_path):
    fake = FakeOpenAI(models=("a",))
    o = opts(tmp_path, targets=parse_targets(["a"], "http://fake"), levels=tuple(parse_levels(None, "20,40", True)),
             slo_ms={}, requests=6, rounds=2, warmup=0, input_len=8, output_len=3)
    outcome = execute(o, Console(file=open("/dev/null", "w")), transport=fake.transport())
    report = outcome.report
    assert [l["request_rate"] for l in report["levels"]] == [20.0, 40.0]
    assert [l["max_concurrency"] for l in report["levels"]] == [None, None]
    assert all(l["comparisons"] == {} and l["results"]["a"]["completed"] == 6 for l in report["levels"])
    assert report["levels"][0]["results"]["a"]["request_goodput"] is None
    assert (outcome.out / "throughput.png").exists() and "B/A" not in (outcome.out / "report.md").read_text()
