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
    @classmethod
    def in_base(cls, source: str) -> "NonFiniteError":
        return cls(f"base tensor {source} has NaN/Inf values",
                   "the base checkpoint is broken; re-download or re-save it. Nothing was written")

    @classmethod
    def in_merge(cls, name: str) -> "NonFiniteError":
        return cls(f"merged tensor {name} has NaN/Inf values",
                   "the adapter or base is broken (check its training run); nothing was written")


class OutputError(MergeError):
    pass


class ValidationError(MergeError):
    pass
