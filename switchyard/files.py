"""Putting a finished output folder in place: built in a temporary folder beside it, then renamed."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


def replace_dir(tmp: Path, out: Path) -> Path:
    """Rename the finished folder `tmp` to `out`. An existing `out` is first moved aside (hidden,
    `.<name>.old-<id>`) and removed only once `tmp` is in place; if that rename fails, it is put
    back and the OSError raised, so a failure never loses both. `tmp` must be on out's file system."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out
