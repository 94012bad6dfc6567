"""The root of every package's exception tree.

    SwitchyardError                 one line for the user: the problem, then what to do next
     +-- ConfigError                (switchyard.config)  a deployment file that does not parse
     +-- EngineError                (deploy.engines)     a vLLM process that failed to start or died
     +-- MergeError                 (merger)             ...each package hangs its own subtree here
     +-- ...

The CLI turns any SwitchyardError into `error: <problem> (<hint>)` and a non-zero exit;
the gateway turns its own into OpenAI-style error bodies. Nothing else should print tracebacks.
"""

from __future__ import annotations


class SwitchyardError(Exception):
    """An error the user can act on. `hint` says what to do next; `exit_code` is the CLI's."""

    exit_code = 2

    def __init__(self, problem: str, hint: str = "") -> None:
        super().__init__(problem)
        self.problem = problem
        self.hint = hint

    def __str__(self) -> str:
        return self.one_line()

    def one_line(self) -> str:
        return f"{self.problem} ({self.hint})" if self.hint else self.problem


class ConfigError(SwitchyardError):
    """A deployment config that is missing, malformed or names files that are not there."""
