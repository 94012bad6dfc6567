"""The merger's exception tree; every message names the problem and, in `hint`, the fix.

    MergeError                      (switchyard.errors.SwitchyardError)
     +-- InputError                 a base or adapter folder that is missing, truncated or unsafe
     +-- UnsupportedAdapterError    an adapter kind or option that cannot be merged exactly
     +-- ShapeMismatchError         an adapter made for another base
     +-- NonFiniteError             NaN/Inf in an input or in a merged tensor
     +-- OutputError                an output folder that exists, or a write that failed
     +-- ValidationError            `switchyard validate` could not run (not: ran and failed)
"""

from __future__ import annotations

from switchyard.errors import SwitchyardError


class MergeError(SwitchyardError):
    """Any merge failure; nothing is left at `--out` when one is raised."""


class InputError(MergeError):
    pass


class UnsupportedAdapterError(MergeError):
    pass


class ShapeMismatchError(MergeError):
    pass


class NonFiniteError(MergeError):
    pass


class OutputError(MergeError):
    pass


class ValidationError(MergeError):
    pass
