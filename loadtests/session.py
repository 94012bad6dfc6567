"""One load test from options to published report (the edge that ties the pieces together).

Order: pre-flight (fails fast, before any file is written) -> plan -> run, appending every record
to `requests.jsonl` in a staging folder beside `--out` -> analysis -> report.json, report.md,
plots -> rename the staging folder to `--out`. Ctrl-C stops the run, keeps what finished, and
still writes (and marks as interrupted) the report.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from loadtests.analysis import LevelResult, analyze
from loadtests.client import StreamingClient, normalize_url, preflight
from loadtests.errors import WorkloadError
from loadtests.records import BatchRecord, RequestRecord, RunLog, Target
from loadtests.report import build_report, publish, render_markdown, staging_dir, write_json
from loadtests.runner import Observer, Sampling, run_plan
from loadtests.workload import LoadLevel, plan, read_prompts, synthetic_prompts


@dataclass(frozen=True)
class LoadTestOptions:
    targets: tuple[Target, ...]
    levels: tuple[LoadLevel, ...]
    out: Path
    requests: int | None = 32
    duration_s: float | None = None
    prompts_file: Path | None = None
    input_len: int | None = None
    output_len: int | None = None
    max_tokens: int | None = None
    ignore_eos: bool = False
    warmup: int = 2
    seed: int = 0
    rounds: int = 4
    endpoint: str = "completions"
    api_key: str | None = None
    slo_ms: dict[str, float] = field(default_factory=dict)
    timeout_s: float = 300.0
    resamples: int = 1000
    plots: bool = True

    @property
    def sampling(self) -> Sampling:
        """--max-tokens wins; else --output-len, which also fixes the length (ignore_eos); else 64."""
        if self.max_tokens is not None:
            return Sampling(self.max_tokens, self.ignore_eos)
        if self.output_len is not None:
            return Sampling(self.output_len, True)
        return Sampling(64, self.ignore_eos)


@dataclass
class Outcome:
    out: Path
    report: dict[str, Any]
    results: list[LevelResult]
    interrupted: bool


def parse_targets(models: Sequence[str], url: str | None) -> tuple[Target, ...]:
    """`--model NAME` (served at --url) or `--model NAME@URL`; labels are the names, made unique
    with the URL's host:port when one name is served at several URLs."""
    if not models:
        raise WorkloadError("no --model given", "pass --model NAME (twice or more to compare)")
    pairs = []
    for spec in models:
        name, sep, where = spec.partition("@")
        if sep and not where.startswith(("http://", "https://")):
            name, where = spec, ""  # an @ inside a model name, not a URL
        where = where or url
        if not where:
            raise WorkloadError(f"no URL for --model {spec!r}", "pass --url URL, or --model NAME@URL")
        pairs.append((name, normalize_url(where)))
    if len(set(pairs)) != len(pairs):
        raise WorkloadError("the same --model is listed twice", "list each model once")
    names = [n for n, _ in pairs]
    return tuple(Target(n if names.count(n) == 1 else f"{n}@{u.split('://', 1)[1]}", u, n) for n, u in pairs)


def parse_slo(text: str | None) -> dict[str, float]:
    """`ttft=500ms,tpot=50ms,e2el=2s` -> milliseconds per metric (a bare number is ms)."""
    out: dict[str, float] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        key, value = key.strip().lower(), value.strip().lower()
        if not sep or key not in ("ttft", "tpot", "e2el"):
            raise WorkloadError(f"--slo part {part!r} is not METRIC=VALUE", "metrics: ttft, tpot, e2el; e.g. ttft=500ms")
        scale = 1.0
        if value.endswith("ms"):
            value = value[:-2]
        elif value.endswith("s"):
            value, scale = value[:-1], 1000.0
        try:
            ms = float(value) * scale
        except ValueError:
            raise WorkloadError(f"--slo value {part!r} is not a duration", "write e.g. 500ms or 0.5s") from None
        if ms <= 0:
            raise WorkloadError(f"--slo value {part!r} must be positive", "write e.g. 500ms")
        out[key] = ms
    return out


def level_settings(level: LoadLevel) -> dict[str, Any]:
    return {"label": level.label, "max_concurrency": level.concurrency,
            "request_rate": level.value if level.mode == "rate" else None,
            "poisson": level.poisson if level.mode == "rate" else None}


def execute(opts: LoadTestOptions, console=None, transport=None) -> Outcome:
    """Run the load test and publish its report to `opts.out`; Ctrl-C publishes a partial one.

    `transport` (an httpx transport) replaces the network, for tests.
    """
    from rich.console import Console

    console = console or Console(stderr=True)
    t0 = time.perf_counter()
    log = RunLog()
    state: dict[str, Any] = {}
    try:
        asyncio.run(_run(opts, log, state, console, clock=lambda: time.perf_counter() - t0, transport=transport))
    except KeyboardInterrupt:
        log.interrupted = True
    except asyncio.CancelledError:
        if not state.get("forced"):
            raise
        log.interrupted = True  # a second Ctrl-C: in-flight requests were abandoned
    except BaseException:
        if "staging" in state:
            shutil.rmtree(state["staging"], ignore_errors=True)
        raise
    finally:
        if "raw" in state:
            state["raw"].close()
    if "staging" not in state:  # interrupted during the pre-flight: nothing ran
        raise KeyboardInterrupt
    return _finish(opts, log, state, console)


async def _run(opts: LoadTestOptions, log: RunLog, state: dict, console, clock, transport=None) -> None:
    from loadtests.progress import RichObserver

    async with StreamingClient(api_key=opts.api_key, endpoint=opts.endpoint, timeout_s=opts.timeout_s,
                               clock=clock, transport=transport) as client:
        ratios = await preflight(client, opts.targets, seed=opts.seed)
        prompts = _prompts(opts, ratios)
        batches = plan([t.label for t in opts.targets], opts.levels, prompts, requests=opts.requests,
                       duration_s=opts.duration_s, rounds=opts.rounds, warmup=opts.warmup, seed=opts.seed)
        state["config"] = _config(opts, ratios)
        state["staging"] = staging_dir(opts.out)
        write_json(state["staging"] / "config.json", state["config"])
        state["raw"] = open(state["staging"] / "requests.jsonl", "w")
        observer = RichObserver(console, RawWriter(state["raw"]))
        with observer, _ctrl_c(state) as stop:
            await run_plan(batches, {t.label: t for t in opts.targets}, client, opts.sampling, log, observer, stop)
        if stop.is_set():
            log.interrupted = True


@contextlib.contextmanager
def _ctrl_c(state: dict):
    """Ctrl-C (SIGINT) sets the yielded event: the run stops sending and lets in-flight requests
    finish, so the partial report is consistent. A second Ctrl-C cancels those too. An event, not
    task cancellation: a cancel can land inside the HTTP client's shielded clean-up and be lost,
    and then the run would simply go on."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    main = asyncio.current_task()

    def on_sigint() -> None:
        if stop.is_set() and main is not None:
            state["forced"] = True
            main.cancel()
        stop.set()

    try:
        loop.add_signal_handler(signal.SIGINT, on_sigint)
        installed = True
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread: Ctrl-C raises as usual
        installed = False
    try:
        yield stop
    finally:
        if installed:
            loop.remove_signal_handler(signal.SIGINT)


class RawWriter(Observer):
    """Appends each record to the raw JSONL as it completes (batches too, tagged by "kind")."""

    def __init__(self, f) -> None:
        self.f = f

    def request_done(self, record: RequestRecord) -> None:
        self.f.write(json.dumps({"kind": "request", **record.to_dict()}) + "\n")

    def batch_done(self, record: BatchRecord) -> None:
        self.f.write(json.dumps({"kind": "batch", **record.to_dict()}) + "\n")
        self.f.flush()


def _prompts(opts: LoadTestOptions, ratios: dict[str, float]) -> list[str]:
    if opts.prompts_file is not None:
        if opts.input_len is not None:
            raise WorkloadError("--prompts and --input-len were both given", "choose one prompt source")
        return read_prompts(opts.prompts_file)
    # size words by the baseline target's tokenizer (the first), so every target gets the same text
    per_word = ratios.get(opts.targets[0].label, 1.0)
    # enough distinct prompts that no level repeats another's (see workload.plan); a --duration
    # run cycles through 256 per level
    per_level = opts.requests if opts.requests is not None else 256
    n = max(1, min(8192, len(opts.levels) * (opts.warmup + per_level)))
    return synthetic_prompts(n, opts.input_len or 128, opts.seed, tokens_per_word=per_word)


def _config(opts: LoadTestOptions, ratios: dict[str, float]) -> dict[str, Any]:
    s = opts.sampling
    if opts.prompts_file is not None:
        workload = f"prompts from {opts.prompts_file}, max_tokens {s.max_tokens}, ignore_eos {s.ignore_eos}"
    else:
        workload = (f"synthetic prompts of ~{opts.input_len or 128} tokens, max_tokens {s.max_tokens}, "
                    f"ignore_eos {s.ignore_eos}")
    per_level = (f"{opts.requests} requests" if opts.requests is not None else f"{opts.duration_s:g} s") \
        + f" in {opts.rounds} interleaved rounds"
    return {
        "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": ["switchyard", *sys.argv[1:]] if sys.argv and "switchyard" in sys.argv[0] else None,
        "targets": [{"label": t.label, "url": t.url, "model": t.model} for t in opts.targets],
        "endpoint": opts.endpoint,
        "levels": [level_settings(l) for l in opts.levels],
        "requests": opts.requests, "duration_s": opts.duration_s, "rounds": opts.rounds,
        "warmup": opts.warmup, "seed": opts.seed,
        "max_tokens": s.max_tokens, "ignore_eos": s.ignore_eos,
        "prompts_file": str(opts.prompts_file) if opts.prompts_file else None,
        "input_len": None if opts.prompts_file else (opts.input_len or 128),
        "prompt_tokens_per_word": ratios,
        "slo_ms": opts.slo_ms or None, "timeout_s": opts.timeout_s, "bootstrap_resamples": opts.resamples,
        "workload": workload, "per_level": per_level,
    }


def _finish(opts: LoadTestOptions, log: RunLog, state: dict, console) -> Outcome:
    results = analyze(log.requests, log.batches, [t.label for t in opts.targets],
                      [l.label for l in opts.levels], slo_ms=opts.slo_ms or None, seed=opts.seed,
                      resamples=opts.resamples)
    report = build_report(state["config"], [level_settings(l) for l in opts.levels], results, log)
    tmp: Path = state["staging"]
    write_json(tmp / "report.json", report)
    (tmp / "report.md").write_text(render_markdown(report))
    if opts.plots:
        from loadtests.plots import write_plots

        write_plots(report, tmp)
    out = publish(tmp, opts.out)
    return Outcome(out, report, results, log.interrupted)
