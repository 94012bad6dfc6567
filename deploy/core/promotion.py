"""The promotion state machine: which steps a promote runs, and the job record they advance.

A promote is a plan (a tuple of steps) run by an executor (deploy.promote) that calls `advance`,
`finish` or `fail` on an immutable `PromoteJob`; every transition returns a new job, so the job the
admin API shows is always a consistent snapshot. Times are passed in (seconds since the epoch).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import Enum


class Step(str, Enum):
    CHECK = "check"          # adapter files, base compatibility, eval set
    MERGE = "merge"          # merger: W + scale·B·A into a new checkpoint
    QUANTIZE = "quantize"    # AWQ W4A16 via llm-compressor
    VALIDATE = "validate"    # candidate vs adapter-on-base on the eval set: the gate
    START = "start"          # merged engine up, health, warm-up
    SWITCH = "switch"        # routing table swap in the gateway
    DRAIN = "drain"          # wait for requests still on the old route
    RECORD = "record"        # registry: deployment, artifact, event


class Status(str, Enum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


def plan_promote(*, quantize: bool, reuse_artifact: bool, dry_run: bool = False) -> tuple[Step, ...]:
    """The steps of one promote. A reused artifact skips merge and quantize (it was validated when made,
    but is validated again: gates may have changed). A dry run stops after the gate."""
    steps = [Step.CHECK]
    if not reuse_artifact:
        steps.append(Step.MERGE)
        if quantize:
            steps.append(Step.QUANTIZE)
    steps.append(Step.VALIDATE)
    if not dry_run:
        steps += [Step.START, Step.SWITCH, Step.DRAIN, Step.RECORD]
    return tuple(steps)


@dataclass(frozen=True)
class StepResult:
    step: Step
    started_at: float
    ended_at: float
    detail: dict = field(default_factory=dict)


@dataclass(frozen=True)
class PromoteJob:
    id: str
    route: str
    plan: tuple[Step, ...]
    created_at: float
    status: Status = Status.RUNNING
    done: tuple[StepResult, ...] = ()
    current: Step | None = None
    current_started_at: float | None = None
    error: str | None = None
    failed_step: Step | None = None

    def begin(self, step: Step, now: float) -> "PromoteJob":
        expected = self.next_step()
        if self.status is not Status.RUNNING or step != expected:
            raise ValueError(f"cannot begin {step.value}: job is {self.status.value}, next is {expected}")
        return replace(self, current=step, current_started_at=now)

    def complete(self, now: float, **detail) -> "PromoteJob":
        if self.current is None:
            raise ValueError("no step in progress")
        result = StepResult(self.current, self.current_started_at or now, now, dict(detail))
        job = replace(self, done=self.done + (result,), current=None, current_started_at=None)
        return replace(job, status=Status.SUCCEEDED) if job.next_step() is None else job

    def fail(self, reason: str, now: float) -> "PromoteJob":
        return replace(self, status=Status.FAILED, error=reason, failed_step=self.current,
                       current=None, current_started_at=None)

    def next_step(self) -> Step | None:
        done = len(self.done)
        return self.plan[done] if done < len(self.plan) else None

    def passed(self, step: Step) -> bool:
        return any(r.step == step for r in self.done)

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "route": self.route,
            "status": self.status.value,
            "plan": [s.value for s in self.plan],
            "done": [
                {"step": r.step.value, "seconds": round(r.ended_at - r.started_at, 3), "ended_at": r.ended_at,
                 "detail": r.detail}
                for r in self.done
            ],
            "current": self.current.value if self.current else None,
            "error": self.error,
            "failed_step": self.failed_step.value if self.failed_step else None,
            "created_at": self.created_at,
        }
