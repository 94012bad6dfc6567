"""Hash the base's shards for the provenance, in a thread of its own, ahead of the merge.

`switchyard merge` starts this before it imports torch (about 1 s on the machines measured, with the
second core idle), so a first merge hashes its first ~1 GB meanwhile: 1.1B shape, 4.3-4.7 s against
5.1-5.3 s (docs/benchmarks.md, Merge). This module must not import torch. When every shard's hash is
known (cached, or the base sits in the HF cache under its commit) nothing is read. A prefetch of the
first 1 GiB (posix_fadvise WILLNEED) for a base that is not in the page cache was tried as well and
measured no faster.

The hasher keeps at most `lead` bytes ahead of the merge (`advance`), so what it reads is still in
the page cache when the merge reads it: the base comes off the disk once, whatever its size. Each
8 MiB slice's pages are dropped from this process once hashed (they stay in the page cache).
"""

from __future__ import annotations

import hashlib
import math
import mmap
import os
import threading
from pathlib import Path
from typing import Optional

from merger import provenance
from merger.errors import InputError
from merger.io.adapter import sha256_file
from merger.io.checkpoint import Checkpoint, drop_pages

LEAD_BYTES = 1 << 30
SLICE_BYTES = 8 << 20


class EarlyBase:
    """One base checkpoint's read-ahead. `hashing`: whether its shards' sha256 are being computed
    (False when all are cached or the base sits in the HF cache with a commit hash)."""

    def __init__(self, base: Path, ckpt: Checkpoint, lead: int = LEAD_BYTES) -> None:
        self.base = Path(base)
        self.paths = [s.path for s in ckpt.shards]
        self.cached = provenance.cached_hashes(self.paths)
        self.commit = provenance.hub_commit(self.base)
        self.hashing = self.commit is None and len(self.cached) < len(self.paths)
        self.lead = lead
        self.position = 0  # bytes read so far, across the shards in order
        self._done = 0  # the merge's progress, in the same units
        self._stopped = False
        self._digests: dict[str, str] = {}
        self._error: Optional[BaseException] = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="sha256-base", daemon=True)

    @classmethod
    def start(cls, base: Path, ckpt: Optional[Checkpoint] = None, lead: int = LEAD_BYTES) -> Optional["EarlyBase"]:
        """Started. Without `ckpt`, None when the base cannot be opened: the merge then says why, in
        its own order of checks."""
        if ckpt is None:
            try:
                ckpt = Checkpoint.open(Path(base))
            except Exception:  # noqa: BLE001 - the merge's own checks name the problem
                return None
        early = cls(base, ckpt, lead)
        if early.hashing:
            early._thread.start()
        return early

    def advance(self, done: int) -> None:
        """The merge has read `done` bytes of the base."""
        with self._cond:
            self._done = done
            self._cond.notify_all()

    def result(self) -> dict[str, str]:
        """Shard file name -> sha256 for every shard (cached ones included); waits for the thread.
        Raises what the thread hit."""
        self.advance(math.inf)  # the merge is over: no more waiting for it
        if self.hashing:
            self._thread.join()
        if self._error is not None:
            raise self._error
        hashes = {p.name: h for p in self.paths if (h := self.cached.get(p.name) or self._digests.get(p.name))}
        if self.hashing and len(hashes) < len(self.paths):  # stopped before the end: never a partial record
            raise RuntimeError(f"the base hash was stopped before the end ({sorted(hashes)} of {len(self.paths)})")
        return hashes

    def stop(self) -> None:
        """End the thread without raising (cleanup after another error, which must not be masked)."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join()

    def _may_read(self, upto: int) -> bool:
        with self._cond:
            while not self._stopped and upto - self._done > self.lead:
                self._cond.wait()
            return not self._stopped

    def _run(self) -> None:
        try:
            self._hash_all()
        except BaseException as e:  # noqa: BLE001 - handed to result()
            self._error = e

    def _hash_all(self) -> None:
        for path in self.paths:
            try:
                self._hash_one(path)
            except OSError as e:
                raise InputError(f"cannot read {path} to hash it: {e.strerror or e}",
                                 "check the base checkpoint's files (permissions, disk); nothing was written") from e
            if self._stopped:
                return

    def _hash_one(self, path: Path) -> None:
        size = os.path.getsize(path)
        if path.name in self.cached:
            self.position += size
            return
        h = hashlib.sha256()
        with open(path, "rb") as f:
            m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
            try:
                for lo in range(0, size, SLICE_BYTES):
                    hi = min(size, lo + SLICE_BYTES)
                    if not self._may_read(self.position + hi - lo):
                        return
                    with memoryview(m)[lo:hi] as part:
                        h.update(part)  # drops the GIL: runs beside the import and the merge
                    drop_pages(m, lo, hi)
                    self.position += hi - lo
            finally:
                if m is not None:
                    m.close()
        self._digests[path.name] = h.hexdigest()


class EarlyFiles:
    """sha256 of a few small input files (the adapters' weights, for the provenance and the default
    output name) in a thread started before the merge's imports, when the second core is idle: the
    1.1B benchmark's 50 MB adapter took ~70 ms to read and hash on the main thread, 3% of its merge."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = [Path(p) for p in paths]
        self._digests: dict[Path, str] = {}
        self._thread = threading.Thread(target=self._run, name="sha256-adapters", daemon=True)

    @classmethod
    def start(cls, paths: list[Path]) -> "EarlyFiles":
        early = cls(paths)
        early._thread.start()
        return early

    def _run(self) -> None:
        for path in self.paths:
            try:
                self._digests[path] = sha256_file(path)
            except (OSError, ValueError):
                pass  # sha256() hashes it again, on the caller's thread, and raises there

    def sha256(self, path: Path) -> str:
        """The file's sha256: this thread's, once done, for a file it was given; else hashed now."""
        path = Path(path)
        if path in self.paths:
            self._thread.join()
            if path in self._digests:
                return self._digests[path]
        return sha256_file(path)

