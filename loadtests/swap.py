"""`loadtest swap`: steady load on one stable name while it is promoted and then rolled back.

The load is a closed loop of `concurrency` streaming requests through the gateway that never
pauses; the switches are driven through the admin API (an object with deploy's AdminClient
methods `promote(name, **body)`, `job(id)`, `rollback(name, actor)`; synchronous, so called in a
thread). The verdict: failed requests (must be 0), and latency in a window before vs after each
switch moment. `switch_windows` is pure; the rest is the edge.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from loadtests.analysis import latency_stats, metric_values
from loadtests.client import StreamingClient
from loadtests.errors import LoadTestError
from loadtests.records import RequestRecord, RunLog, Target
from loadtests.runner import Observer, Sampling

LEVEL = "swap"
FAILURE_BACKOFF_S = 0.05


@dataclass(frozen=True)
class SwitchEvent:
    """One admin action on the run's clock: requested at `start`, answered at `end`; the routing
    table changed at `switched_at` (from the job's step timings; None if it never switched)."""

    action: str  # "promote" | "rollback"
    start: float
    end: float
    switched_at: float | None
    ok: bool
    detail: str = ""


def switch_windows(requests: Sequence[RequestRecord], events: Sequence[SwitchEvent],
                   window_s: float) -> list[dict[str, Any]]:
    """Per switch: requests that STARTED within `window_s` before vs after the switch moment —
    how many, how many failed, and their TTFT/ITL/E2E stats (ms). Pure."""
    out = []
    for ev in events:
        if ev.switched_at is None:
            continue
        t = ev.switched_at
        sides = {"before": [r for r in requests if t - window_s <= r.start < t],
                 "after": [r for r in requests if t <= r.start < t + window_s]}
        # requests in flight at the switch are the ones that could break: count them apart
        spanning = [r for r in requests if r.start < t <= r.end]
        entry: dict[str, Any] = {"action": ev.action, "switched_at": t, "window_s": window_s,
                                 "in_flight_at_switch": len(spanning),
                                 "in_flight_failed": sum(not r.success for r in spanning)}
        for side, reqs in sides.items():
            stats = {"requests": len(reqs), "failed": sum(not r.success for r in reqs)}
            for m in ("ttft", "itl", "e2el"):
                stats.update(latency_stats(m, metric_values(reqs, m)))
            entry[side] = stats
        out.append(entry)
    return out


async def steady_load(client: StreamingClient, target: Target, prompts: Sequence[str], sampling: Sampling,
                      concurrency: int, stop: asyncio.Event, log: RunLog, observer: Observer) -> None:
    """`concurrency` workers send back-to-back requests until `stop` is set; in-flight ones finish."""
    counter = 0

    async def worker() -> None:
        nonlocal counter
        while not stop.is_set():
            i, counter = counter, counter + 1
            rec = await client.send(target, prompts[i % len(prompts)], max_tokens=sampling.max_tokens,
                                    ignore_eos=sampling.ignore_eos, level=LEVEL, batch=0, index=i, warmup=False)
            log.requests.append(rec)
            observer.request_done(rec)
            if not rec.success:  # a broken route answers at once: do not spin on it
                await asyncio.sleep(FAILURE_BACKOFF_S)

    async with asyncio.TaskGroup() as tg:
        for _ in range(concurrency):
            tg.create_task(worker())


async def drive_switches(admin, name: str, clock: Callable[[], float], *, settle_s: float, actor: str,
                         promote_body: dict, poll_s: float = 0.5, promote_timeout_s: float = 1800.0,
                         say: Callable[[str], None] = lambda s: None) -> list[SwitchEvent]:
    """Wait `settle_s`, promote (and wait for the job), wait `settle_s`, roll back, wait `settle_s`."""
    events = []
    await asyncio.sleep(settle_s)
    start = clock()
    say(f"promote {name}...")
    job = await asyncio.to_thread(admin.promote, name, actor=actor, **promote_body)
    while job["status"] == "running":
        if clock() - start > promote_timeout_s:
            raise LoadTestError(f"promote {name} still running after {promote_timeout_s:.0f} s",
                                "check `switchyard status`; the load was stopped")
        await asyncio.sleep(poll_s)
        job = await asyncio.to_thread(admin.job, job["id"])
    end = clock()
    events.append(SwitchEvent("promote", start, end, _switch_moment(job, start, end),
                              job["status"] == "succeeded", job.get("error") or ""))
    say(f"promote {name}: {job['status']}")
    if job["status"] != "succeeded":
        return events
    await asyncio.sleep(settle_s)
    start = clock()
    say(f"rollback {name}...")
    result = await asyncio.to_thread(admin.rollback, name, actor)
    end = clock()
    switched = result.get("switched_in_s")
    # switched_in_s counts from the service's start of the rollback (adapter reload included) to the
    # route switch; draining the merged engine happens after the answer
    events.append(SwitchEvent("rollback", start, end, min(start + switched, end) if switched is not None else end,
                              True, f"retiring {result.get('retiring')}"))
    say(f"rollback {name}: done")
    await asyncio.sleep(settle_s)
    return events


def _switch_moment(job: dict, start: float, end: float) -> float | None:
    """When the route switched, on our clock: `start` (we asked; the service created the job) plus the
    service's time from creating the job to the end of its "switch" step, capped at `end`. Only
    differences of the service's clock are used, so clock skew between machines does not matter.
    Jobs without timestamps: start plus the step durations (which miss the time between steps)."""
    elapsed = 0.0
    for step in job.get("done", []):
        elapsed += float(step.get("seconds", 0.0))
        if step.get("step") == "switch":
            if step.get("ended_at") is not None and job.get("created_at") is not None:
                elapsed = float(step["ended_at"]) - float(job["created_at"])
            return min(start + max(elapsed, 0.0), end)
    return None


def swap_report(name: str, log: RunLog, events: Sequence[SwitchEvent], window_s: float) -> dict[str, Any]:
    reqs = log.requests
    return {
        "name": name,
        "interrupted": log.interrupted,
        "requests_total": len(reqs),
        "requests_failed": sum(not r.success for r in reqs),
        "events": [asdict(e) for e in events],
        "windows": switch_windows(reqs, events, window_s),
        "errors": sorted({r.error for r in reqs if r.error}),
        "requests": [r.to_dict() for r in reqs],
    }


# --- the edge: run, write, publish -------------------------------------------------------------

@dataclass(frozen=True)
class SwapOptions:
    name: str
    url: str
    out: Path
    api_key: str | None = None
    concurrency: int = 4
    settle_s: float = 10.0
    window_s: float = 5.0
    input_len: int = 64
    max_tokens: int = 32
    endpoint: str = "completions"
    promote_body: tuple[tuple[str, Any], ...] = ()
    actor: str = "loadtest-swap"
    timeout_s: float = 120.0
    seed: int = 0


def execute_swap(opts: SwapOptions, admin, console, transport=None) -> dict[str, Any]:
    """Run the swap under load and publish swap.json, swap.md and timeline.png to `opts.out`.

    Raises LoadTestError when any request failed (after writing the report) or the promote failed.
    """
    import time

    from loadtests.report import publish, staging_dir, write_json

    t0 = time.perf_counter()
    clock = lambda: time.perf_counter() - t0  # noqa: E731
    log, events = RunLog(), []

    async def main() -> None:
        async with StreamingClient(api_key=opts.api_key, endpoint=opts.endpoint, timeout_s=opts.timeout_s,
                                   clock=clock, transport=transport) as client:
            from loadtests.client import preflight
            from loadtests.workload import synthetic_prompts

            target = Target(opts.name, opts.url, opts.name)
            ratios = await preflight(client, [target], seed=opts.seed)
            prompts = synthetic_prompts(256, opts.input_len, opts.seed, tokens_per_word=ratios[opts.name])
            stop = asyncio.Event()
            load = asyncio.create_task(steady_load(client, target, prompts, Sampling(opts.max_tokens, True),
                                                   opts.concurrency, stop, log, Observer()))
            try:
                events.extend(await drive_switches(admin, opts.name, clock, settle_s=opts.settle_s,
                                                   actor=opts.actor, promote_body=dict(opts.promote_body),
                                                   say=lambda s: console.print(f"[{clock():7.1f} s] {s}")))
            finally:
                stop.set()
                await load

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        log.interrupted = True
    report = swap_report(opts.name, log, events, opts.window_s)
    tmp = staging_dir(opts.out)
    write_json(tmp / "swap.json", report)
    (tmp / "swap.md").write_text(render_swap_markdown(report))
    from loadtests.plots import write_timeline

    write_timeline(report, tmp / "timeline.png")
    out = publish(tmp, opts.out)
    console.print(render_swap_markdown(report, with_title=False))
    console.print(f"swap report written to {out}")
    if events and not events[0].ok:
        raise LoadTestError(f"promote {opts.name} failed: {events[0].detail}", f"see {out}/swap.md")
    if report["requests_failed"]:
        raise LoadTestError(f"{report['requests_failed']} of {report['requests_total']} requests failed "
                            "during the swap", f"see {out}/swap.md")
    if log.interrupted:
        raise KeyboardInterrupt
    return report


def render_swap_markdown(report: dict[str, Any], with_title: bool = True) -> str:
    lines = [f"# switchyard loadtest swap {report['name']}", ""] if with_title else []
    lines += [f"requests: {report['requests_total']}, failed: **{report['requests_failed']}**"
              + (" (interrupted)" if report["interrupted"] else ""), ""]
    for ev in report["events"]:
        sw = "never" if ev["switched_at"] is None else f"{ev['switched_at']:.2f} s"
        lines.append(f"- {ev['action']}: requested at {ev['start']:.2f} s, answered at {ev['end']:.2f} s, "
                     f"switched at {sw}, {'ok' if ev['ok'] else 'FAILED ' + ev['detail']}")
    lines.append("")
    for w in report["windows"]:
        lines += [f"## around the {w['action']} switch ({w['window_s']:g} s each side; "
                  f"{w['in_flight_at_switch']} in flight at the switch, {w['in_flight_failed']} of them failed)", "",
                  "| window | requests | failed | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | E2E p50 | E2E p99 |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for side in ("before", "after"):
            s = w[side]
            lines.append(f"| {side} | {s['requests']} | {s['failed']} | {s['p50_ttft_ms']:.1f} | {s['p99_ttft_ms']:.1f} | "
                         f"{s['p50_itl_ms']:.2f} | {s['p99_itl_ms']:.2f} | {s['p50_e2el_ms']:.1f} | {s['p99_e2el_ms']:.1f} |")
        empty = [side for side in ("before", "after") if not w[side]["requests"]]
        if empty:  # one slow request can span a short window at low concurrency
            lines.append(f"no request started in the {' or '.join(empty)} window: widen --window "
                         "(and --settle) or raise --concurrency")
        lines.append("")
    if report["errors"]:
        lines += ["errors: " + "; ".join(report["errors"][:10]), ""]
    return "\n".join(lines)
