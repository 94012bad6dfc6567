"""The statistics against distributions whose answers are known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from loadtests.analysis import (
    analyze, bootstrap_ratio, compare, latency_stats, meets_slo, percentile, summarize, _mean,
    _percentile_stat,
)
from loadtests.records import BatchRecord, RequestRecord

NORMAL_Z = {50: 0.0, 90: 1.2815515655446004, 99: 2.3263478740408408}


def request(target="a", batch=0, start=0.0, ttft=0.1, itl=0.01, n_tokens=5, warmup=False,
            error=None, prompt_tokens=10, level="concurrency=1", index=0) -> RequestRecord:
    first = start + ttft
    times = tuple(first + i * itl for i in range(n_tokens))
    return RequestRecord(target=target, level=level, batch=batch, index=index, warmup=warmup,
                         start=start, end=times[-1] if n_tokens else first, first_token=first if n_tokens else None,
                         token_times=times, prompt_tokens=prompt_tokens, output_tokens=n_tokens,
                         output_tokens_from="usage", status=200 if error is None else 500, error=error)


def test_percentile_matches_normal_quantiles():
    rng = np.random.default_rng(1)
    sample = rng.normal(100.0, 15.0, size=200_000)
    for p, z in NORMAL_Z.items():
        assert percentile(sample, p) == pytest.approx(100.0 + 15.0 * z, abs=0.25)


def test_percentile_interpolates_linearly_and_handles_empty():
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([0.0, 10.0], 90) == pytest.approx(9.0)
    assert math.isnan(percentile([], 50))


def test_latency_stats_are_milliseconds_with_vllm_keys():
    s = latency_stats("ttft", [0.1, 0.2, 0.3])
    assert s["mean_ttft_ms"] == pytest.approx(200.0)
    assert s["median_ttft_ms"] == pytest.approx(200.0)
    assert s["p99_ttft_ms"] == pytest.approx(298.0)
    assert s["std_ttft_ms"] == pytest.approx(np.std([100, 200, 300]))
    assert latency_stats("itl", [])["p90_itl_ms"] == 0.0


def test_request_derived_timings():
    r = request(start=1.0, ttft=0.5, itl=0.1, n_tokens=6)
    assert r.ttft == pytest.approx(0.5)
    assert r.itls == pytest.approx([0.1] * 5)
    assert r.e2el == pytest.approx(1.0)
    assert r.tpot == pytest.approx(0.1)
    assert request(n_tokens=1).tpot is None


def test_summarize_throughput_counts_only_measured_batches_and_successes():
    reqs = [request(batch=0, index=i, n_tokens=4) for i in range(3)]
    reqs.append(request(batch=0, index=3, error="boom"))
    reqs.append(request(batch=-1, warmup=True, n_tokens=100))
    batches = [BatchRecord("a", "concurrency=1", 0, False, 0.0, 2.0, 4),
               BatchRecord("a", "concurrency=1", -1, True, 0.0, 50.0, 1)]
    s = summarize(reqs, batches, slo_ms={"ttft": 150.0})
    assert s["duration"] == 2.0
    assert (s["completed"], s["failed"]) == (3, 1)
    assert s["total_output_tokens"] == 12 and s["total_input_tokens"] == 30
    assert s["output_throughput"] == pytest.approx(6.0)
    assert s["total_token_throughput"] == pytest.approx(21.0)
    assert s["request_throughput"] == pytest.approx(1.5)
    assert s["request_goodput"] == pytest.approx(1.5)
    assert summarize(reqs, batches)["request_goodput"] is None


def test_goodput_rejects_requests_over_any_slo():
    fast, slow = request(ttft=0.1, itl=0.01), request(ttft=0.1, itl=0.2)
    slo = {"ttft": 200.0, "tpot": 50.0}
    assert meets_slo(fast, slo) and not meets_slo(slow, slo)
    assert not meets_slo(request(error="x"), slo)


def test_bootstrap_interval_covers_the_true_ratio_most_of_the_time():
    # B's mean is 1.2x A's; a 95% interval should cover 1.2 in roughly 95% of repeated experiments
    rng = np.random.default_rng(7)
    trials, covered = 200, 0
    for t in range(trials):
        a = rng.normal(10.0, 2.0, size=60)
        b = rng.normal(12.0, 2.4, size=60)
        est = bootstrap_ratio([[x] for x in a], [[x] for x in b], _mean, seed=t, resamples=500)
        covered += est.low <= 1.2 <= est.high
    assert 0.88 <= covered / trials <= 0.99


def test_bootstrap_finds_a_real_difference_significant():
    rng = np.random.default_rng(3)
    a = [[x] for x in rng.normal(10.0, 1.0, size=100)]
    b = [[x] for x in rng.normal(13.0, 1.0, size=100)]
    est = bootstrap_ratio(a, b, _percentile_stat(50), seed=0)
    assert est.significant and est.low > 1.2 and est.ratio == pytest.approx(1.3, abs=0.05)


def test_identical_samples_are_not_significant_and_seed_repeats():
    rng = np.random.default_rng(5)
    a = [[x] for x in rng.exponential(1.0, size=80)]
    est = bootstrap_ratio(a, a, _mean, seed=11)
    assert est.ratio == 1.0 and est.low < 1.0 < est.high
    assert est.verdict == "not significant"
    assert bootstrap_ratio(a, a, _mean, seed=11) == est


def test_bootstrap_needs_two_groups():
    est = bootstrap_ratio([[1.0]], [[2.0], [3.0]], _mean, seed=0)
    assert est.low is None and est.verdict == "insufficient data"


def test_compare_resamples_requests_and_batches():
    a_reqs, b_reqs, a_b, b_b = [], [], [], []
    for k in range(4):
        a_reqs += [request("a", k, itl=0.02, index=i, ttft=0.1 + 0.01 * i) for i in range(8)]
        b_reqs += [request("b", k, itl=0.01, index=i, ttft=0.1 + 0.01 * i) for i in range(8)]
        a_b.append(BatchRecord("a", "concurrency=1", k, False, 0.0, 2.0 + 0.1 * k, 8))
        b_b.append(BatchRecord("b", "concurrency=1", k, False, 0.0, 1.0 + 0.05 * k, 8))
    c = compare(a_reqs, a_b, b_reqs, b_b, seed=0, resamples=300)
    assert c["mean_itl_ms"].ratio == pytest.approx(0.5) and c["mean_itl_ms"].significant
    assert c["output_throughput"].ratio == pytest.approx(2.0) and c["output_throughput"].significant
    assert c["mean_ttft_ms"].ratio == pytest.approx(1.0) and not c["mean_ttft_ms"].significant
    assert c["p99_e2el_ms"].a > c["p99_e2el_ms"].b


def test_analyze_compares_every_target_with_the_first():
    reqs, bats = [], []
    for t, itl in (("a", 0.02), ("b", 0.01), ("c", 0.04)):
        for k in range(2):
            reqs += [request(t, k, itl=itl, index=i) for i in range(3)]
            bats.append(BatchRecord(t, "concurrency=1", k, False, 0.0, 1.0, 3))
    res = analyze(reqs, bats, ["a", "b", "c"], ["concurrency=1", "concurrency=4"], seed=0, resamples=100)
    assert [r.label for r in res] == ["concurrency=1"]
    assert set(res[0].comparisons) == {"b", "c"}
    assert res[0].comparisons["c"]["mean_tpot_ms"].ratio == pytest.approx(2.0)
