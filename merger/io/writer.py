"""Write safetensors shards as their tensors are produced.

Every output tensor's dtype and shape is known before any weight is read, so each shard's header
(and so every tensor's offset) is computed first (`plan_shards`, pure) and the tensor bytes are then
appended in order. Memory bound: the writer buffers nothing; it holds only the tensor being written.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from merger.errors import OutputError
from merger.io.checkpoint import DTYPE_SIZES
from merger.io.directwrite import ALIGN, DirectFile
from merger.io.splicewrite import SpliceRefused, SpliceWriter

_PARALLEL_HASH_BYTES = 1 << 20  # below this a thread hand-off costs more than it saves
_SPLICE_BYTES = 64 << 10  # smaller writes (headers, norms) gain nothing from the pipe


@dataclass(frozen=True)
class OutTensor:
    name: str
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = DTYPE_SIZES[self.dtype]
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class ShardPlan:
    filename: str
    tensors: tuple[OutTensor, ...]
    header: bytes  # the 8-byte length prefix + JSON header, padded to 8 bytes

    @property
    def size(self) -> int:
        return len(self.header) + sum(t.nbytes for t in self.tensors)


def parse_size(text: str) -> int:
    """'2GB' -> 2e9 bytes, '500MiB' -> 500 * 2**20; a bare number is bytes."""
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40,
             "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    s = text.strip().upper()
    for unit, factor in units.items():
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * factor)
    return int(s)


def _header(tensors: list[OutTensor], metadata: dict[str, str]) -> bytes:
    entries: dict = {"__metadata__": metadata}
    offset = 0
    for t in tensors:
        entries[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    body = json.dumps(entries, separators=(",", ":")).encode()
    # tensor data starts at a page boundary (safetensors only needs 8): tensors whose sizes are
    # multiples of 4 KiB then stay aligned in the file, which lets O_DIRECT write them in place
    body += b" " * (-(8 + len(body)) % ALIGN)
    return struct.pack("<Q", len(body)) + body


def plan_shards(tensors: list[OutTensor], max_shard_bytes: int) -> list[ShardPlan]:
    """Greedy in-order packing; a tensor larger than the limit gets a shard of its own."""
    groups: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if groups[-1] and size + t.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    n = len(groups)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    return [ShardPlan(name, tuple(g), _header(g, {"format": "pt"})) for name, g in zip(names, groups)]


def index_json(shards: list[ShardPlan]) -> dict:
    total = sum(t.nbytes for s in shards for t in s.tensors)
    return {"metadata": {"total_size": total},
            "weight_map": {t.name: s.filename for s in shards for t in s.tensors}}


class StreamingShardWriter:
    """Appends tensors, in plan order, to the shards of `plans` under `folder`; hashes as it goes,
    unless `hashing` is False (the caller hashes the same bytes itself: merger/ordered.py)."""

    def __init__(self, folder: Path, plans: list[ShardPlan], hashing: bool = True) -> None:
        self.folder = folder
        self.plans = plans
        self.hashing = hashing
        self.sha256: dict[str, str] = {}
        self._queue = [(p, t) for p in plans for t in p.tensors]
        self._pos = 0
        self._file = None
        self._direct: DirectFile | None = None  # the shard, when written past the page cache
        self._hash = None
        self._plan: ShardPlan | None = None
        self._hash_pool: ThreadPoolExecutor | None = None
        self._splice = SpliceWriter()

    def _open(self, plan: ShardPlan) -> None:
        self._close_current()
        self._plan = plan
        path = self.folder / plan.filename
        # O_DIRECT where the file system takes it (merger.io.directwrite); else the page cache
        self._direct = DirectFile.open(path)
        self._file = open(path, "wb", buffering=0) if self._direct is None else None
        self._hash = hashlib.sha256()
        self._write(plan.header)

    def _write(self, data) -> None:
        # sha256 runs in a second thread while this one writes the same bytes (both release the GIL);
        # it is awaited before returning, so the caller may reuse `data` at once and hashes stay in order
        view = memoryview(data).cast("B")
        hashing = None
        if self.hashing and view.nbytes >= _PARALLEL_HASH_BYTES:
            hashing = self._hasher().submit(self._hash.update, view)
        elif self.hashing:
            self._hash.update(view)
        try:
            if self._direct is not None:
                self._direct.write(view)
                view = view[view.nbytes:]
            elif self._splice.usable and view.nbytes >= _SPLICE_BYTES:
                try:
                    self._splice.write(self._file.fileno(), view)
                    view = view[view.nbytes:]
                except SpliceRefused:
                    pass  # refused before any byte moved: write() below, and from now on
            while view:
                n = self._file.write(view)
                view = view[n:]
        except OSError as exc:
            raise self._failed(exc) from exc
        finally:
            if hashing is not None:
                hashing.result()

    def _failed(self, exc: OSError) -> OutputError:
        if exc.errno == errno.ENOSPC:
            return OutputError(f"disk full while writing {self._plan.filename}",
                               "free space beside --out and retry; the partial output was removed")
        return OutputError(f"cannot write {self._plan.filename}: {exc.strerror}", "check --out")

    def _hasher(self) -> ThreadPoolExecutor:
        if self._hash_pool is None:
            self._hash_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256")
        return self._hash_pool

    def write(self, name: str, data) -> None:
        """`data`: a bytes-like object holding exactly the planned bytes of tensor `name`."""
        self.write_parts(name, (data,))

    def write_parts(self, name: str, parts) -> None:
        """Tensor `name`'s planned bytes, given as consecutive parts (an iterable of bytes-like
        objects, each written before the next is asked for)."""
        plan, expected = self._queue[self._pos]
        if expected.name != name:
            raise AssertionError(f"writer expected {expected.name}, got {name}")
        if self._plan is not plan:
            self._open(plan)
        total = 0
        for part in parts:
            total += memoryview(part).nbytes
            if total > expected.nbytes:
                raise AssertionError(f"{name}: more than the planned {expected.nbytes} B")
            self._write(part)
        if total != expected.nbytes:
            raise AssertionError(f"{name}: {total} B written, {expected.nbytes} B planned")
        self._pos += 1

    def _close_current(self) -> None:
        if self._direct is not None:
            try:
                self._direct.close()
            except OSError as exc:  # the staged tail, the length or the fsync
                raise self._failed(exc) from exc
            finally:
                self._direct = None
            if self.hashing:
                self.sha256[self._plan.filename] = self._hash.hexdigest()
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            if self.hashing:
                self.sha256[self._plan.filename] = self._hash.hexdigest()
            self._file = None

    def close(self) -> None:
        """Finish the last shard; every planned tensor must have been written."""
        if self._pos != len(self._queue):
            raise AssertionError(f"writer closed after {self._pos} of {len(self._queue)} tensors")
        if not self._queue:  # a model with no tensors still gets its (empty) shard
            for plan in self.plans:
                self._open(plan)
        self._close_current()
        self._stop_hasher()
        self._splice.close()

    def abort(self) -> None:
        if self._direct is not None:
            self._direct.abort()
            self._direct = None
        if self._file is not None:
            self._file.close()
            self._file = None
        self._stop_hasher()
        self._splice.close()

    def _stop_hasher(self) -> None:
        if self._hash_pool is not None:
            self._hash_pool.shutdown(wait=True)
            self._hash_pool = None
