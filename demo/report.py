"""The build report: base vs adapter exact-match accuracy per task (pure data and rendering)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class TaskScore:
    task: str
    adapter: str  # the adapter's stable name
    n: int  # eval items
    base: float  # base accuracy on this task, in [0, 1]
    adapter_acc: float  # the task's own adapter, in [0, 1]


@dataclass(frozen=True)
class BuildReport:
    recipe_sha: str
    parameters: int
    vocab_size: int
    dtype: str
    scores: tuple[TaskScore, ...]
    build_seconds: float
    recipe: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "BuildReport":
        raw = dict(raw)
        raw["scores"] = tuple(TaskScore(**s) for s in raw["scores"])
        return cls(**raw)


def table_rows(report: BuildReport) -> list[tuple[str, str, str, str, str]]:
    """(task, adapter, eval items, base accuracy, adapter accuracy) as display strings."""
    return [(s.task, s.adapter, str(s.n), f"{s.base:.0%}", f"{s.adapter_acc:.0%}") for s in report.scores]


def render_markdown(report: BuildReport) -> str:
    lines = [
        "# Demo build report",
        "",
        f"Base: {report.parameters:,} parameters, vocab {report.vocab_size}, saved as {report.dtype}. "
        f"Built in {report.build_seconds:.0f} s. Recipe {report.recipe_sha[:12]}.",
        "",
        "Exact-match accuracy on each held-out eval set (greedy decoding, in-process transformers/PEFT):",
        "",
        "| task | adapter | eval items | base | adapter |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {' | '.join(row)} |" for row in table_rows(report)]
    return "\n".join(lines) + "\n"


def weak_adapters(report: BuildReport, margin: float = 0.5) -> list[str]:
    """One line per adapter that does not beat the base on its own task by `margin` (accuracy points)."""
    return [
        f"adapter {s.adapter} scores {s.adapter_acc:.0%} on {s.task} vs the base's {s.base:.0%}"
        " (tune demo/recipe.py: more LoRA steps or a higher learning rate)"
        for s in report.scores
        if s.adapter_acc < s.base + margin
    ]
