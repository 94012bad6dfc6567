"""What to send and when (pure apart from `read_prompts`): prompts, load levels and the batch plan.

A plan is a list of batches. At each load level every target gets its warm-up batch, then R
measured rounds; in each round every target runs one batch alone (the order rotates each round so
no target always goes first), so all targets see the machine in the same conditions over time.
Every target gets the same prompts in the same order. All randomness comes from the seed.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from loadtests.errors import WorkloadError

# common English words: byte-level BPE vocabularies tend to give one token each, with the space
_WORDS = tuple(
    "the of and to in is that for it as was with be by on not he this are or his from at which but"
    " have an they you were her she there been one all we their has would when if so no what up out"
    " about into than them can only other time new some could these two may first then do any like"
    " my now over such our man me even most made after also did many off before must well back"
    " through years where much your way down should because each just those people how too little"
    " state good very make world still own see men work long get here between both life being under"
    " never day same another know while last might us great old year come since against go came"
    " right used take three".split()
)

MAX_SCHEDULED_ARRIVALS = 1_000_000  # a runaway --rate x --duration stops here, not in memory


@dataclass(frozen=True)
class LoadLevel:
    """Either a fixed number of requests in flight, or an arrival rate (requests/s) per target."""

    mode: str  # "concurrency" | "rate"
    value: float
    poisson: bool = False

    @property
    def label(self) -> str:
        if self.mode == "concurrency":
            return f"concurrency={int(self.value)}"
        return f"rate={self.value:g}/s" + (" poisson" if self.poisson else "")

    @property
    def concurrency(self) -> int | None:
        return int(self.value) if self.mode == "concurrency" else None


@dataclass(frozen=True)
class Batch:
    """Requests of one target at one level, run alone. Request i sends `prompts[i % len(prompts)]`.

    It ends after `count` requests, or once `time_budget_s` has passed (then in-flight requests
    finish); `arrivals` (seconds after the batch start) pace a rate level, None means as fast as
    `level.concurrency` allows.
    """

    target: str
    level: LoadLevel
    batch: int  # -1 for the warm-up batch
    prompts: tuple[str, ...]
    count: int | None
    time_budget_s: float | None = None
    arrivals: tuple[float, ...] | None = None

    @property
    def warmup(self) -> bool:
        return self.batch < 0


def parse_levels(concurrency: str | None, rate: str | None, poisson: bool) -> list[LoadLevel]:
    """`--concurrency 1,4,16` or `--rate 2,8` (exactly one of them) into levels, in the order given."""
    if concurrency and rate:
        raise WorkloadError("--concurrency and --rate were both given", "choose one of them")
    if rate:
        values = _parse_numbers("--rate", rate)
        return [LoadLevel("rate", v, poisson) for v in values]
    values = _parse_numbers("--concurrency", concurrency or "1")
    if any(v != int(v) for v in values):
        raise WorkloadError(f"--concurrency {concurrency!r} has a fraction", "use whole numbers, e.g. 1,4,16")
    return [LoadLevel("concurrency", int(v)) for v in values]


def _parse_numbers(option: str, text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise WorkloadError(f"{option} {text!r} is not a list of numbers", "write e.g. 1,4,16") from None
    if len(set(values)) != len(values):
        raise WorkloadError(f"{option} {text!r} repeats a value", "list each load level once")
    if not values or any(v <= 0 or not math.isfinite(v) for v in values):
        raise WorkloadError(f"{option} {text!r} needs positive numbers", "write e.g. 1,4,16")
    return values


def read_prompts(path: Path) -> list[str]:
    """Prompts from a JSONL file whose lines are objects with a "prompt" string (other keys ignored)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise WorkloadError(f"cannot read prompts file {path}: {exc.strerror}", "pass an existing .jsonl file") from None
    prompts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise WorkloadError(f"{path}:{n} is not JSON ({exc.msg})", 'each line must be {"prompt": "..."}') from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"]:
            raise WorkloadError(f'{path}:{n} has no "prompt" string', 'each line must be {"prompt": "..."}')
        prompts.append(obj["prompt"])
    if not prompts:
        raise WorkloadError(f"{path} has no prompts", 'add lines like {"prompt": "..."}')
    return prompts


def synthetic_prompts(n: int, input_len: int, seed: int, tokens_per_word: float = 1.0) -> list[str]:
    """`n` distinct random-word prompts of about `input_len` tokens each.

    `tokens_per_word` (measured on the target by the pre-flight probe) converts tokens to words;
    the true prompt length is the server's usage report, recorded per request.
    """
    if input_len < 1 or n < 1:
        raise WorkloadError("--input-len and the number of prompts must be at least 1", "pass e.g. --input-len 128")
    rng = random.Random(seed)
    words = max(1, round(input_len / max(tokens_per_word, 1e-6)))
    return [" ".join(rng.choice(_WORDS) for _ in range(words)) for _ in range(n)]


def arrival_offsets(rate: float, poisson: bool, seed: int, *, count: int | None = None,
                    horizon_s: float | None = None) -> tuple[float, ...]:
    """Arrival times from 0 at `rate`/s: evenly spaced, or exponential gaps (a Poisson process).

    Stops after `count` arrivals or past `horizon_s`, whichever is given (at most 1e6).
    """
    rng = random.Random(seed)
    out, t = [], 0.0
    limit = min(count if count is not None else MAX_SCHEDULED_ARRIVALS, MAX_SCHEDULED_ARRIVALS)
    while len(out) < limit:
        if horizon_s is not None and t >= horizon_s:
            break
        out.append(t)
        # even spacing as i/rate, not a running sum, so no float drift over long runs
        t = t + rng.expovariate(rate) if poisson else len(out) / rate
    return tuple(out)


def split_evenly(total: int, parts: int) -> list[int]:
    """`total` into `parts` near-equal non-negative counts, larger ones first."""
    q, r = divmod(total, parts)
    return [q + (i < r) for i in range(parts)]


def plan(targets: Sequence[str], levels: Sequence[LoadLevel], prompts: Sequence[str], *,
         requests: int | None, duration_s: float | None, rounds: int, warmup: int,
         seed: int) -> list[Batch]:
    """Every batch of the run, in execution order (see the module docstring).

    Per target and level: `requests` measured requests, or `duration_s` seconds of measured load,
    split over `rounds` batches (fewer at a concurrency level where `rounds` batches would each hold
    fewer requests than the concurrency); plus `warmup` excluded requests first.
    """
    if (requests is None) == (duration_s is None):
        raise WorkloadError("give exactly one of --requests and --duration", "e.g. --requests 64")
    if requests is not None and requests < 1 or duration_s is not None and duration_s <= 0:
        raise WorkloadError("--requests/--duration must be positive", "e.g. --requests 64 or --duration 30")
    if not prompts:
        raise WorkloadError("no prompts to send", "pass --prompts FILE.jsonl or --input-len N")
    rounds = max(1, min(rounds, requests if requests is not None else rounds))
    order = list(prompts)
    random.Random(seed).shuffle(order)
    batches: list[Batch] = []
    for li, level in enumerate(levels):
        # each level starts further into the pool, so a large enough pool never repeats a prompt
        # (a repeat would be served from vLLM's prefix cache)
        level_start = li * (warmup + (requests or 0))
        if warmup > 0:
            for t in targets:
                batches.append(_batch(t, level, -1, order, level_start, warmup, None, seed + li))
        level_rounds = rounds
        if requests is not None and level.concurrency:
            # a batch smaller than the concurrency would never reach it: use fewer, fuller rounds
            level_rounds = max(1, min(rounds, requests // level.concurrency))
        counts = split_evenly(requests, level_rounds) if requests is not None else [None] * level_rounds
        budget = duration_s / level_rounds if duration_s is not None else None
        offset = level_start + warmup
        for k in range(level_rounds):
            rotated = list(targets[k % len(targets):]) + list(targets[: k % len(targets)])
            for t in rotated:
                batches.append(_batch(t, level, k, order, offset, counts[k], budget, seed + 1000 * li + k))
            offset += counts[k] if counts[k] is not None else 0
    return batches


def _batch(target: str, level: LoadLevel, k: int, order: list[str], offset: int, count: int | None,
           budget: float | None, seed: int) -> Batch:
    n = len(order)
    rotated = tuple(order[(offset + i) % n] for i in range(n))
    arrivals = None
    if level.mode == "rate" and k >= 0:
        arrivals = arrival_offsets(level.value, level.poisson, seed, count=count, horizon_s=budget)
    return Batch(target, level, k, rotated, count, budget, arrivals)
