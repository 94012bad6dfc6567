"""deploy's exception tree.

    SwitchyardError
     +-- DeployError          a deployment operation that cannot go on
          +-- PromoteError    a promote that stopped at a step (the routes are unchanged)
          +-- RollbackError   a rollback that could not switch the route back
          +-- RegistryError   the registry file cannot be opened or is from another schema
     +-- EngineError          (deploy.engines) an engine that would not start or died
"""

from __future__ import annotations

from switchyard.errors import SwitchyardError


class DeployError(SwitchyardError):
    """A deployment operation that cannot go on."""


class PromoteError(DeployError):
    """A promote stopped at `step`; nothing was switched."""

    def __init__(self, problem: str, hint: str = "", *, step: str = "") -> None:
        super().__init__(problem, hint)
        self.step = step


class RollbackError(DeployError):
    """A rollback that could not move the route back to the adapter."""


class RegistryError(DeployError):
    """The registry cannot be opened or read."""
