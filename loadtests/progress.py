"""The terminal side: a rich progress bar per load level and the summary table at the end."""

from __future__ import annotations

from typing import Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from loadtests.analysis import LevelResult
from loadtests.records import BatchRecord, RequestRecord
from loadtests.runner import Observer
from loadtests.workload import LoadLevel


class RichObserver(Observer):
    """One bar per level (requests done of planned, warm-ups included; failures counted);
    forwards every event to `inner` (the raw-record writer)."""

    def __init__(self, console: Console, inner: Observer | None = None) -> None:
        self.inner = inner or Observer()
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[failed]} failed"), TimeElapsedColumn(),
                                 console=console, transient=False)
        self.task = None

    def __enter__(self) -> "RichObserver":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def level_started(self, level: LoadLevel, total: int | None) -> None:
        self.task = self.progress.add_task(level.label, total=total, failed=0)
        self.inner.level_started(level, total)

    def request_done(self, record: RequestRecord) -> None:
        if self.task is not None:
            failed = self.progress.tasks[-1].fields["failed"] + (not record.success)
            self.progress.update(self.task, advance=1, failed=failed)
        self.inner.request_done(record)

    def batch_done(self, record: BatchRecord) -> None:
        self.inner.batch_done(record)

    def level_finished(self, level: LoadLevel) -> None:
        self.inner.level_finished(level)


def summary_table(results: Sequence[LevelResult]) -> Table:
    table = Table(title="switchyard loadtest (latencies in ms)", show_lines=False)
    for col in ("level", "target", "done", "failed", "req/s", "out tok/s", "TTFT mean", "TTFT p99",
                "ITL mean", "ITL p99", "E2E p50", "E2E p99"):
        table.add_column(col, justify="left" if col in ("level", "target") else "right")
    for res in results:
        for i, (t, s) in enumerate(res.summaries.items()):
            table.add_row(res.label if i == 0 else "", t, str(s["completed"]), str(s["failed"]),
                          f"{s['request_throughput']:.2f}", f"{s['output_throughput']:.1f}",
                          f"{s['mean_ttft_ms']:.1f}", f"{s['p99_ttft_ms']:.1f}", f"{s['mean_itl_ms']:.2f}",
                          f"{s['p99_itl_ms']:.2f}", f"{s['p50_e2el_ms']:.1f}", f"{s['p99_e2el_ms']:.1f}")
    return table


COMPARISON_COLUMNS = (("output_throughput", "out tok/s"), ("request_throughput", "req/s"),
                      ("mean_ttft_ms", "TTFT mean"), ("mean_itl_ms", "ITL mean"),
                      ("p99_itl_ms", "ITL p99"), ("p99_e2el_ms", "E2E p99"))


def comparison_table(results: Sequence[LevelResult]) -> Table | None:
    """B/A per metric as `ratio [low, high]`, bold when significant; None with a single target."""
    if not any(res.comparisons for res in results):
        return None
    table = Table(title="B/A ratios, 95% bootstrap intervals (bold: significant, the interval excludes 1)")
    table.add_column("level")
    table.add_column("B / A")
    for _, label in COMPARISON_COLUMNS:
        table.add_column(label, justify="right")
    for res in results:
        base = next(iter(res.summaries))
        for i, (b, comp) in enumerate(res.comparisons.items()):
            cells = []
            for key, _ in COMPARISON_COLUMNS:
                e = comp[key]
                text = f"{e.ratio:.2f}" + ("" if e.low is None else f" [{e.low:.2f}, {e.high:.2f}]")
                cells.append(f"[bold]{text}[/]" if e.significant else text)
            table.add_row(res.label if i == 0 else "", f"{b} / {base}", *cells)
    return table
