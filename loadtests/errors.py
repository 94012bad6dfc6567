"""The load tester's exception tree.

    SwitchyardError
     +-- LoadTestError        anything the load tester reports as one line
          +-- TargetError     the endpoint is unreachable, refuses the key, or does not serve a model
          +-- WorkloadError   a prompts file, schedule or option that does not parse
"""

from __future__ import annotations

from switchyard.errors import SwitchyardError


class LoadTestError(SwitchyardError):
    """A load test that cannot run or cannot be reported."""


class TargetError(LoadTestError):
    """The endpoint under test is unreachable, rejects us, or lacks a model we asked for."""


class WorkloadError(LoadTestError):
    """A prompts file, load schedule, SLO or option value that does not parse."""
