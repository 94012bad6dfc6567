"""Restart backoff for engines that exit unexpectedly: pure, so the schedule is testable."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Delay before restart n (0-based): base·factor^n, capped; the streak resets after a stable run."""

    base_s: float = 1.0
    factor: float = 2.0
    cap_s: float = 60.0
    stable_after_s: float = 120.0

    def delay(self, restarts_in_streak: int) -> float:
        return min(self.cap_s, self.base_s * self.factor ** max(0, restarts_in_streak))

    def next_streak(self, streak: int, ran_for_s: float) -> int:
        """The streak count after an exit: reset when the engine had been up long enough."""
        return 0 if ran_for_s >= self.stable_after_s else streak + 1
