"""The streaming client and the runner against a canned fake upstream (fast; no engine)."""

from __future__ import annotations

import asyncio
import time

import pytest

from loadtests.analysis import analyze
from loadtests.client import StreamingClient, normalize_url, preflight
from loadtests.errors import TargetError
from loadtests.records import RunLog, Target
from loadtests.runner import Sampling, run_plan
from loadtests.workload import parse_levels, plan
from tests.loadtests.fake_upstream import FakeOpenAI

URL = "http://fake"


def client_for(fake, **kw):
    t0 = time.perf_counter()
    return StreamingClient(transport=fake.transport(), clock=lambda: time.perf_counter() - t0, **kw)


def send(fake, model="a", max_tokens=5, **kw):
    async def go():
        async with client_for(fake, **kw) as c:
            return await c.send(Target(model, URL, model), "one two three", max_tokens=max_tokens,
                                ignore_eos=True, level="l", batch=0, index=0, warmup=False)
    return asyncio.run(go())


def test_records_every_chunk_and_usage():
    fake = FakeOpenAI(ttft_s=0.05, itl_s=0.01)
    r = send(fake, max_tokens=6)
    assert r.success and r.status == 200
    assert r.output_tokens == 6 and r.output_tokens_from == "usage" and r.prompt_tokens == 3
    assert len(r.token_times) == 6
    assert r.ttft >= 0.045 and all(x >= 0.008 for x in r.itls)
    assert r.end >= r.token_times[-1] >= r.first_token > r.start
    body = fake.bodies[0]
    assert body["stream_options"] == {"include_usage": True} and body["ignore_eos"] is True
    assert body["prompt"] == "one two three" and body["max_tokens"] == 6


def test_counts_chunks_without_usage_and_skips_chat_role_chunk():
    fake = FakeOpenAI(send_usage=False, role_chunk=True, ttft_s=0.03)
    r = send(fake, max_tokens=4, endpoint="chat")
    assert r.output_tokens == 4 and r.output_tokens_from == "chunks" and r.prompt_tokens is None
    assert r.ttft >= 0.025  # the role chunk came at once; TTFT waits for text
    assert fake.bodies[0]["messages"] == [{"role": "user", "content": "one two three"}]


def test_failures_become_records_not_exceptions():
    r = send(FakeOpenAI(fail_model="a"))
    assert not r.success and r.status == 500 and "engine exploded" in r.error
    slow = send(FakeOpenAI(ttft_s=5.0), timeout_s=0.2)
    assert not slow.success and "timed out" in slow.error and slow.e2el < 1.0


def test_normalize_url():
    assert normalize_url("http://h:8000/v1/") == "http://h:8000" == normalize_url("http://h:8000")
    with pytest.raises(TargetError):
        normalize_url("h:8000")


def run_preflight(fake, targets, **kw):
    async def go():
        async with client_for(fake, **kw) as c:
            return await preflight(c, targets)
    return asyncio.run(go())


def test_preflight_names_unknown_model_and_bad_key():
    fake = FakeOpenAI(models=("a", "b"))
    with pytest.raises(TargetError, match=r"model 'zz' is not served at http://fake.*served there: a, b"):
        run_preflight(fake, [Target("a", URL, "a"), Target("zz", URL, "zz")])
    with pytest.raises(TargetError, match="api-key"):
        run_preflight(FakeOpenAI(api_key="k"), [Target("a", URL, "a")], api_key="wrong")
    with pytest.raises(TargetError, match="engine exploded"):
        run_preflight(FakeOpenAI(fail_model="a"), [Target("a", URL, "a")])
    ratios = run_preflight(FakeOpenAI(prompt_tokens=64), [Target("a", URL, "a")])
    assert ratios == {"a": 2.0}


def test_preflight_bad_url_fails_fast():
    async def go():
        async with StreamingClient(connect_timeout_s=1.0) as c:
            await preflight(c, [Target("a", "http://127.0.0.1:9", "a")])
    t = time.monotonic()
    with pytest.raises(TargetError, match="cannot connect"):
        asyncio.run(go())
    assert time.monotonic() - t < 5


def run(fake, levels, **plan_kw):
    targets = {t: Target(t, URL, t) for t in ("a", "b")}
    batches = plan(list(targets), levels, [f"p {i}" for i in range(8)], seed=0, **plan_kw)
    log = RunLog()

    async def go():
        async with client_for(fake) as c:
            await run_plan(batches, targets, c, Sampling(max_tokens=4, ignore_eos=True), log)
    asyncio.run(go())
    return log


def test_runner_interleaves_without_overlap_and_holds_concurrency():
    fake = FakeOpenAI(delays={"a": (0.01, 0.002), "b": (0.01, 0.012)})
    levels = parse_levels("1,3", None, False)
    log = run(fake, levels, requests=6, duration_s=None, rounds=2, warmup=1)
    assert fake.max_in_flight == 3
    spans = sorted((b.start, b.end) for b in log.batches)
    assert all(e1 <= s2 + 1e-9 for (_, e1), (s2, _) in zip(spans, spans[1:]))
    for b in log.batches:  # every request lies inside its batch
        reqs = [r for r in log.requests if (r.target, r.level, r.batch) == (b.target, b.level, b.batch)]
        assert len(reqs) == b.requests and all(b.start <= r.start and r.end <= b.end for r in reqs)
    res = analyze(log.requests, log.batches, ["a", "b"], [l.label for l in levels], seed=0, resamples=200)
    assert [r.summaries["a"]["completed"] for r in res] == [6, 6]
    itl = res[1].comparisons["b"]["mean_itl_ms"]
    assert itl.ratio > 1.5 and itl.significant  # b was made 6x slower per token (margin for a busy CPU)


def test_runner_paces_a_rate_level():
    fake = FakeOpenAI(ttft_s=0.001, itl_s=0.001)
    log = run(fake, parse_levels(None, "20", False), requests=4, duration_s=None, rounds=1, warmup=0)
    starts = sorted(r.start for r in log.requests if r.target == "a")
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert sum(gaps) / len(gaps) == pytest.approx(0.05, abs=0.015)  # paced, not all at once


def test_cancelled_run_keeps_a_consistent_partial_log():
    fake = FakeOpenAI(ttft_s=0.01, itl_s=0.01)
    targets = {"a": Target("a", URL, "a")}
    batches = plan(["a"], parse_levels("2", None, False), ["x"], requests=1000, duration_s=None,
                   rounds=1, warmup=0, seed=0)
    log = RunLog()

    async def go():
        async with client_for(fake) as c:
            task = asyncio.create_task(run_plan(batches, targets, c, Sampling(3, True), log))
            await asyncio.sleep(0.3)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    asyncio.run(go())
    assert 0 < len(log.requests) < 1000
    assert len(log.batches) == 1 and log.batches[0].requests == len(log.requests)


@pytest.mark.parametrize("levels", ["2", "rate=40"])
def test_stop_event_ends_the_run_cleanly(levels):
    """What Ctrl-C does in the CLI: no new request after `stop` is set, in-flight ones finish
    successfully, the current batch is closed, later batches never start."""
    fake = FakeOpenAI(ttft_s=0.01, itl_s=0.01)
    targets = {"a": Target("a", URL, "a"), "b": Target("b", URL, "b")}
    parsed = parse_levels(None, "40", False) if levels.startswith("rate") else parse_levels(levels, None, False)
    batches = plan(["a", "b"], parsed, ["x"], requests=1000, duration_s=None, rounds=1, warmup=0, seed=0)
    log = RunLog()

    async def go():
        stop = asyncio.Event()
        async with client_for(fake) as c:
            asyncio.get_running_loop().call_later(0.3, stop.set)
            await asyncio.wait_for(run_plan(batches, targets, c, Sampling(3, True), log, stop=stop), 10)
    asyncio.run(go())
    assert 0 < len(log.requests) < 1000 and all(r.success for r in log.requests)
    assert [b.target for b in log.batches] == ["a"] and log.batches[0].requests == len(log.requests)
    assert max(r.end for r in log.requests) <= log.batches[0].end
