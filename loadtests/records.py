"""The raw record of a load test: what happened to every request and every batch, nothing derived.

Times are seconds on one monotonic clock, measured from the start of the run, so records from
interleaved batches of different models can be laid on one timeline. Everything the report says
(percentiles, throughput, ratios) is computed from these records by `analysis` (pure).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class RequestRecord:
    """One request as the client saw it.

    `token_times` holds the arrival time of every streamed chunk that carried generated text
    (the first is `first_token`); `output_tokens` comes from the server's usage report when it
    sent one (`output_tokens_from == "usage"`), else it is the number of such chunks.
    A request succeeded when `error` is None and at least one token arrived.
    """

    target: str  # the label of the model under test (unique within a run)
    level: str  # the load level's label, e.g. "concurrency=4"
    batch: int  # which round-robin batch of this target at this level
    index: int  # position of the request within its batch
    warmup: bool
    start: float
    end: float
    first_token: float | None = None
    token_times: tuple[float, ...] = ()
    prompt_tokens: int | None = None
    output_tokens: int = 0
    output_tokens_from: str = "chunks"
    status: int | None = None
    error: str | None = None

    @property
    def success(self) -> bool:
        return self.error is None and self.first_token is not None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.start

    @property
    def e2el(self) -> float:
        return self.end - self.start

    @property
    def itls(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def tpot(self) -> float | None:
        """Decode time per output token after the first (vLLM's definition); None for < 2 tokens."""
        if self.first_token is None or self.output_tokens < 2:
            return None
        return (self.end - self.first_token) / (self.output_tokens - 1)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["token_times"] = list(self.token_times)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RequestRecord":
        return cls(**{**d, "token_times": tuple(d.get("token_times", ()))})


@dataclass(frozen=True)
class BatchRecord:
    """One batch: requests of one target at one load level, run while no other target ran."""

    target: str
    level: str
    batch: int
    warmup: bool
    start: float
    end: float
    requests: int

    @property
    def duration(self) -> float:
        return self.end - self.start

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Target:
    """A model under test: `model` as served at `url`, shown as `label`."""

    label: str
    url: str
    model: str


@dataclass
class RunLog:
    """Records appended as they complete (mutable on purpose: an interrupted run keeps what it has)."""

    requests: list[RequestRecord] = field(default_factory=list)
    batches: list[BatchRecord] = field(default_factory=list)
    interrupted: bool = False
