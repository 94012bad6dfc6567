"""The demo package's exception tree.

    SwitchyardError
     +-- DemoError        the demo artifacts could not be built, read or scored
"""

from __future__ import annotations

from switchyard.errors import SwitchyardError


class DemoError(SwitchyardError):
    """The demo artifacts could not be built, read or scored."""
