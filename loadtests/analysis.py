"""Statistics over the raw record (pure: no I/O, randomness only from a seed passed in).

Per (target, load level): vLLM `bench serve`'s aggregates under vLLM's names (`request_throughput`,
`output_throughput`, `total_token_throughput`, `request_goodput`, `mean_ttft_ms`, `p99_itl_ms`, ...),
computed the way vLLM computes them (numpy's linear-interpolation percentiles, TPOT excluding the
first token, ITL pooled over requests). Warm-up requests and batches are excluded.

Throughput of a target is its tokens over the time its own batches ran (batches of different
targets never overlap), so interleaved targets are each measured alone, in turn.

For two targets, B/A ratios carry a percentile-bootstrap 95% interval: latencies resample requests
(a request's ITLs stay together, being correlated), throughputs resample batches. A difference is
"significant" when the interval excludes 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np

from loadtests.records import BatchRecord, RequestRecord

PERCENTILES = (50, 90, 99)
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")
THROUGHPUT_METRICS = ("request_throughput", "output_throughput", "total_token_throughput")
SLO_METRICS = ("ttft", "tpot", "e2el")  # the ones vLLM's --goodput accepts


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0..100), linearly interpolated like numpy's default; NaN when empty."""
    if len(values) == 0:
        return float("nan")
    return float(np.percentile(np.asarray(values, dtype=float), p))


def latency_stats(name: str, values_s: Sequence[float]) -> dict[str, float]:
    """mean/median/std and p50/p90/p99 of seconds, reported in milliseconds (vLLM's keys).

    Empty input gives 0.0 everywhere, as vLLM does, so report fields always exist.
    """
    v = np.asarray(values_s if len(values_s) else [0.0], dtype=float) * 1000.0
    out = {f"mean_{name}_ms": float(v.mean()), f"median_{name}_ms": float(np.median(v)),
           f"std_{name}_ms": float(v.std())}
    for p in PERCENTILES:
        out[f"p{p}_{name}_ms"] = float(np.percentile(v, p))
    return out


def metric_values(requests: Iterable[RequestRecord], name: str) -> list[float]:
    """Per-request values in seconds (ITLs pooled); failed requests contribute nothing."""
    ok = [r for r in requests if r.success]
    if name == "ttft":
        return [r.ttft for r in ok]
    if name == "e2el":
        return [r.e2el for r in ok]
    if name == "tpot":
        return [r.tpot for r in ok if r.tpot is not None]
    if name == "itl":
        return [x for r in ok for x in r.itls]
    raise ValueError(f"unknown metric {name!r}")


def meets_slo(r: RequestRecord, slo_ms: dict[str, float]) -> bool:
    """vLLM's goodput rule: every SLO met; a request with < 2 tokens has TPOT 0."""
    if not r.success:
        return False
    values = {"ttft": r.ttft, "tpot": r.tpot or 0.0, "e2el": r.e2el}
    return all(values[k] * 1000.0 <= limit for k, limit in slo_ms.items())


def summarize(requests: Sequence[RequestRecord], batches: Sequence[BatchRecord],
              slo_ms: dict[str, float] | None = None) -> dict[str, float | int | None]:
    """Aggregates for one target at one level. `duration` is the sum of its measured batches' times."""
    reqs = [r for r in requests if not r.warmup]
    duration = sum(b.duration for b in batches if not b.warmup)
    ok = [r for r in reqs if r.success]
    total_in = sum(r.prompt_tokens or 0 for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    per_s = (lambda x: x / duration) if duration > 0 else (lambda x: 0.0)
    out: dict[str, float | int | None] = {
        "duration": duration,
        "completed": len(ok),
        "failed": len(reqs) - len(ok),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": per_s(len(ok)),
        "request_goodput": per_s(sum(meets_slo(r, slo_ms) for r in ok)) if slo_ms else None,
        "output_throughput": per_s(total_out),
        "total_token_throughput": per_s(total_in + total_out),
    }
    for name in LATENCY_METRICS:
        out.update(latency_stats(name, metric_values(reqs, name)))
    return out


# --- bootstrap ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class RatioEstimate:
    """B/A of one statistic, with a bootstrap interval; `low`/`high` are None without enough data."""

    metric: str
    a: float
    b: float
    ratio: float
    low: float | None
    high: float | None

    @property
    def verdict(self) -> str:
        if self.low is None or self.high is None:
            return "insufficient data"
        if self.low > 1.0 or self.high < 1.0:
            return "significant"
        return "not significant"

    @property
    def significant(self) -> bool:
        return self.verdict == "significant"

    def to_dict(self) -> dict[str, object]:
        return {"a": self.a, "b": self.b, "ratio": self.ratio, "ci_low": self.low,
                "ci_high": self.high, "significant": self.significant, "verdict": self.verdict}




def bootstrap_ratio(a_groups: Sequence[Sequence[float]], b_groups: Sequence[Sequence[float]],
                    stat: Callable[[np.ndarray], float], *, seed: int, resamples: int = 1000,
                    confidence: float = 0.95, metric: str = "") -> RatioEstimate:
    """stat(B)/stat(A) with a two-sample percentile-bootstrap interval.

    Each side is a list of groups (a request's values, or one value per request); a resample draws
    groups with replacement and applies `stat` to their pooled values. Needs >= 2 groups per side
    for an interval. The RNG is seeded, so the same inputs give the same interval.
    """
    a_flat = _pool(a_groups)
    b_flat = _pool(b_groups)
    a0, b0 = stat(a_flat), stat(b_flat)
    ratio = _safe_ratio(b0, a0)
    if len(a_groups) < 2 or len(b_groups) < 2 or len(a_flat) == 0 or len(b_flat) == 0:
        return RatioEstimate(metric, a0, b0, ratio, None, None)
    rng = np.random.default_rng(seed)
    a_star = _resampled_stats(a_groups, stat, rng, resamples)
    b_star = _resampled_stats(b_groups, stat, rng, resamples)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = b_star / a_star
    ratios = ratios[np.isfinite(ratios)]
    if len(ratios) == 0:
        return RatioEstimate(metric, a0, b0, ratio, None, None)
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(ratios, [tail, 100.0 - tail])
    return RatioEstimate(metric, a0, b0, ratio, float(low), float(high))


def _pool(groups: Sequence[Sequence[float]]) -> np.ndarray:
    return np.concatenate([np.asarray(g, dtype=float) for g in groups]) if groups else np.zeros(0)


def _resampled_stats(groups: Sequence[Sequence[float]], stat: Callable[[np.ndarray], float],
                     rng: np.random.Generator, resamples: int) -> np.ndarray:
    n = len(groups)
    picks = rng.integers(0, n, size=(resamples, n))
    if all(len(g) == 1 for g in groups):  # one value per group: vectorize over resamples
        values = np.asarray([g[0] for g in groups], dtype=float)[picks]
        return np.apply_along_axis(stat, 1, values) if not hasattr(stat, "axiswise") \
            else stat.axiswise(values)  # type: ignore[attr-defined]
    arrays = [np.asarray(g, dtype=float) for g in groups]
    return np.asarray([stat(np.concatenate([arrays[i] for i in row])) for row in picks])


def _safe_ratio(b: float, a: float) -> float:
    return float(b / a) if a != 0 else float("nan")


def _mean(x: np.ndarray) -> float:
    return float(np.mean(x)) if len(x) else float("nan")


_mean.axiswise = lambda m: np.mean(m, axis=1)  # type: ignore[attr-defined]


def _percentile_stat(p: float) -> Callable[[np.ndarray], float]:
    def stat(x: np.ndarray) -> float:
        return float(np.percentile(x, p)) if len(x) else float("nan")

    stat.axiswise = lambda m: np.percentile(m, p, axis=1)  # type: ignore[attr-defined]
    return stat


def _latency_groups(requests: Sequence[RequestRecord], name: str) -> list[list[float]]:
    reqs = [r for r in requests if not r.warmup]
    if name == "itl":
        return [r.itls for r in reqs if r.success and r.itls]
    return [[v] for v in metric_values(reqs, name)]


def _throughput_groups(requests: Sequence[RequestRecord], batches: Sequence[BatchRecord],
                       name: str) -> list[tuple[float, float]]:
    """(amount, seconds) per measured batch, so a resample's rate is sum(amount)/sum(seconds)."""
    out = []
    for b in batches:
        if b.warmup:
            continue
        ok = [r for r in requests if r.batch == b.batch and not r.warmup and r.success]
        amount = {"request_throughput": len(ok),
                  "output_throughput": sum(r.output_tokens for r in ok),
                  "total_token_throughput": sum(r.output_tokens + (r.prompt_tokens or 0) for r in ok),
                  }[name]
        out.append((float(amount), b.duration))
    return out


def _rate_stat(pairs: np.ndarray) -> float:
    # pairs arrive pooled as [amount, seconds, amount, seconds, ...]
    m = pairs.reshape(-1, 2)
    return float(m[:, 0].sum() / m[:, 1].sum()) if m[:, 1].sum() > 0 else float("nan")


def compare(a_requests: Sequence[RequestRecord], a_batches: Sequence[BatchRecord],
            b_requests: Sequence[RequestRecord], b_batches: Sequence[BatchRecord],
            *, seed: int, resamples: int = 1000) -> dict[str, RatioEstimate]:
    """B/A for every throughput and every latency statistic (mean, p50, p90, p99), keyed by the
    summary's field name (e.g. `p99_itl_ms`). One target's records per side, one level."""
    out: dict[str, RatioEstimate] = {}
    for i, name in enumerate(THROUGHPUT_METRICS):
        ga = [list(p) for p in _throughput_groups(a_requests, a_batches, name)]
        gb = [list(p) for p in _throughput_groups(b_requests, b_batches, name)]
        out[name] = bootstrap_ratio(ga, gb, _rate_stat, seed=seed + i, resamples=resamples, metric=name)
    for j, name in enumerate(LATENCY_METRICS):
        ga, gb = _latency_groups(a_requests, name), _latency_groups(b_requests, name)
        stats: list[tuple[str, Callable[[np.ndarray], float]]] = [(f"mean_{name}_ms", _mean)]
        stats += [(f"p{p}_{name}_ms", _percentile_stat(p)) for p in PERCENTILES]
        for k, (key, stat) in enumerate(stats):
            est = bootstrap_ratio(ga, gb, stat, seed=seed + 100 * (j + 1) + k,
                                  resamples=resamples, metric=key)
            out[key] = _to_ms(est)
    return out


def _to_ms(e: RatioEstimate) -> RatioEstimate:
    return RatioEstimate(e.metric, e.a * 1000.0, e.b * 1000.0, e.ratio, e.low, e.high)


# --- the whole run -----------------------------------------------------------------------------

@dataclass(frozen=True)
class LevelResult:
    """One load level: each target's summary, and B/A ratios of every other target B against the
    first target A (the baseline), keyed by B's label."""

    label: str
    summaries: dict[str, dict]
    comparisons: dict[str, dict[str, RatioEstimate]]


def analyze(requests: Sequence[RequestRecord], batches: Sequence[BatchRecord],
            targets: Sequence[str], levels: Sequence[str], *, slo_ms: dict[str, float] | None = None,
            seed: int = 0, resamples: int = 1000) -> list[LevelResult]:
    """Summaries and comparisons for every level that has records, in the order given."""
    results = []
    for level in levels:
        by_target = {t: ([r for r in requests if r.level == level and r.target == t],
                         [b for b in batches if b.level == level and b.target == t]) for t in targets}
        if not any(reqs for reqs, _ in by_target.values()):
            continue
        summaries = {t: summarize(reqs, bats, slo_ms) for t, (reqs, bats) in by_target.items()}
        comparisons = {}
        if len(targets) >= 2:
            a_reqs, a_bats = by_target[targets[0]]
            for t in targets[1:]:
                comparisons[t] = compare(a_reqs, a_bats, *by_target[t], seed=seed, resamples=resamples)
        results.append(LevelResult(level, summaries, comparisons))
    return results
