"""Executes a plan: batch after batch, each at its level's concurrency or arrival rate.

Batches never overlap, so a target's throughput is its own. Records go into the RunLog (and to
`observer.request_done`, which the CLI uses to append the raw JSONL and move the progress bar) as
each request finishes; a cancelled run (Ctrl-C) still closes its current batch's record, so the
partial log is consistent: every recorded request lies inside a recorded batch.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Mapping, Sequence

from loadtests.client import StreamingClient
from loadtests.records import BatchRecord, RequestRecord, RunLog, Target
from loadtests.workload import Batch, LoadLevel


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    ignore_eos: bool


class Observer:
    """Hooks for progress display and raw-record streaming; the defaults do nothing."""

    def level_started(self, level: LoadLevel, total: int | None) -> None: ...

    def request_done(self, record: RequestRecord) -> None: ...

    def batch_done(self, record: BatchRecord) -> None: ...

    def level_finished(self, level: LoadLevel) -> None: ...


async def run_plan(batches: Sequence[Batch], targets: Mapping[str, Target], client: StreamingClient,
                   sampling: Sampling, log: RunLog, observer: Observer | None = None,
                   stop: asyncio.Event | None = None) -> RunLog:
    """Run every batch in order, appending to `log`. Returns `log` (also when it ends early).

    `stop` (set by the CLI's Ctrl-C handler) ends the run cleanly: no new request is sent, the ones
    in flight finish, the current batch is closed.
    """
    observer = observer or Observer()
    current: LoadLevel | None = None
    for i, batch in enumerate(batches):
        if stop is not None and stop.is_set():
            break
        if batch.level != current:
            if current is not None:
                observer.level_finished(current)
            current = batch.level
            observer.level_started(current, _level_total(batches[i:], current))
        await run_batch(batch, targets[batch.target], client, sampling, log, observer, stop)
    if current is not None:
        observer.level_finished(current)
    return log


async def run_batch(batch: Batch, target: Target, client: StreamingClient, sampling: Sampling,
                    log: RunLog, observer: Observer, stop: asyncio.Event | None = None) -> None:
    clock = client.clock
    start = clock()
    done = 0

    async def one(i: int) -> None:
        nonlocal done
        rec = await client.send(target, batch.prompts[i % len(batch.prompts)],
                                max_tokens=sampling.max_tokens, ignore_eos=sampling.ignore_eos,
                                level=batch.level.label, batch=batch.batch, index=i, warmup=batch.warmup)
        log.requests.append(rec)
        done += 1
        observer.request_done(rec)

    try:
        if batch.arrivals is not None:
            await _paced(batch, start, clock, one, stop)
        else:
            await _closed_loop(batch, start, clock, one, stop)
    finally:  # also on cancellation: the partial batch stays accounted for
        rec = BatchRecord(target.label, batch.level.label, batch.batch, batch.warmup, start, clock(), done)
        log.batches.append(rec)
        observer.batch_done(rec)


async def _closed_loop(batch: Batch, start: float, clock, one, stop: asyncio.Event | None = None) -> None:
    """Keep `concurrency` requests in flight until `count` are sent or the time budget is spent."""
    next_index = 0

    def take() -> int | None:
        nonlocal next_index
        if stop is not None and stop.is_set():
            return None
        if batch.count is not None and next_index >= batch.count:
            return None
        if batch.time_budget_s is not None and clock() - start >= batch.time_budget_s:
            return None
        next_index += 1
        return next_index - 1

    async def worker() -> None:
        while (i := take()) is not None:
            await one(i)

    workers = batch.level.concurrency or batch.count or 1  # a rate level's warm-up: all at once
    if batch.count is not None:
        workers = min(workers, batch.count)
    async with asyncio.TaskGroup() as tg:
        for _ in range(workers):
            tg.create_task(worker())


async def _paced(batch: Batch, start: float, clock, one, stop: asyncio.Event | None = None) -> None:
    """Send request i at `start + arrivals[i]` regardless of how many are in flight (open loop)."""
    stop = stop or asyncio.Event()
    async with asyncio.TaskGroup() as tg:
        for i, at in enumerate(batch.arrivals):
            delay = start + at - clock()
            if delay > 0:
                try:  # sleep until the arrival, or until stopped
                    await asyncio.wait_for(stop.wait(), delay)
                except TimeoutError:
                    pass
            if stop.is_set():
                break
            tg.create_task(one(i))


def _level_total(batches: Sequence[Batch], level: LoadLevel) -> int | None:
    """Requests planned at `level` (None when a batch is time-bound)."""
    total = 0
    for b in batches:
        if b.level != level:
            break
        n = b.count if b.count is not None else (len(b.arrivals) if b.arrivals is not None else None)
        if n is None:
            return None
        total += n
    return total
