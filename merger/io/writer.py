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
import threading
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


def _pack(tensors: list[OutTensor], limit: int) -> list[list[OutTensor]]:
    """Greedy in-order packing under `limit` bytes; a tensor larger than it gets a shard of its own."""
    groups: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if groups[-1] and size + t.nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    return groups


def plan_shards(tensors: list[OutTensor], max_shard_bytes: int) -> list[ShardPlan]:
    """In-order packing into as few shards as `max_shard_bytes` allows (a larger tensor gets a shard of
    its own), balanced: the largest shard as small as that count allows. Why balanced: each shard's
    sha256 is one sequential stream, and merger/ordered.py hashes shards on both cores at once; greedy
    packing left the 1.1B benchmark model a 2.0 GB and a 0.2 GB shard, one stream doing nearly all."""
    groups = _pack(tensors, max_shard_bytes)
    n = len(groups)
    if n > 1:  # the smallest limit that still packs into n shards (the count only falls as it grows)
        lo = -(-sum(t.nbytes for t in tensors) // n)
        hi = max_shard_bytes
        while lo < hi:
            mid = (lo + hi) // 2
            if len(_pack(tensors, mid)) <= n:
                hi = mid
            else:
                lo = mid + 1
        groups = _pack(tensors, hi)
        n = len(groups)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    return [ShardPlan(name, tuple(g), _header(g, {"format": "pt"})) for name, g in zip(names, groups)]


def index_json(shards: list[ShardPlan]) -> dict:
    total = sum(t.nbytes for s in shards for t in s.tensors)
    return {"metadata": {"total_size": total},
            "weight_map": {t.name: s.filename for s in shards for t in s.tensors}}


class _OpenShard:
    """One shard being written: its file (O_DIRECT where the file system takes it, merger.io.directwrite;
    else the page cache), its hash, the next of its tensors."""

    def __init__(self, folder: Path, plan: ShardPlan, hashing: bool) -> None:
        self.plan = plan
        path = folder / plan.filename
        self.direct = DirectFile.open(path)
        self.file = open(path, "wb", buffering=0) if self.direct is None else None
        self.hash = hashlib.sha256() if hashing else None
        self.pos = 0

    def failed(self, exc: OSError) -> OutputError:
        if exc.errno == errno.ENOSPC:
            return OutputError(f"disk full while writing {self.plan.filename}",
                               "free space beside --out and retry; the partial output was removed")
        return OutputError(f"cannot write {self.plan.filename}: {exc.strerror}", "check --out")

    def close(self) -> str | None:
        """Flush, fsync and close -> the file's sha256 when hashing."""
        try:
            if self.direct is not None:
                direct, self.direct = self.direct, None
                direct.close()  # the staged tail, the length, the fsync
            if self.file is not None:
                self.file.flush()
                os.fsync(self.file.fileno())
        except OSError as exc:
            raise self.failed(exc) from exc
        finally:
            if self.file is not None:
                self.file.close()
                self.file = None
        return None if self.hash is None else self.hash.hexdigest()

    def abort(self) -> None:
        if self.direct is not None:
            self.direct.abort()
            self.direct = None
        if self.file is not None:
            self.file.close()
            self.file = None


class TensorStream:
    """One tensor being written in parts (StreamingShardWriter.open_tensor)."""

    def __init__(self, writer: "StreamingShardWriter", i: int, shard: _OpenShard, tensor: OutTensor) -> None:
        self._writer, self._i, self._shard, self.tensor = writer, i, shard, tensor
        self.written = 0

    def write(self, part) -> None:
        self.written += memoryview(part).nbytes
        if self.written > self.tensor.nbytes:
            raise AssertionError(f"{self.tensor.name}: more than the planned {self.tensor.nbytes} B")
        self._writer._write(self._shard, part)

    def close(self) -> None:
        if self.written != self.tensor.nbytes:
            raise AssertionError(f"{self.tensor.name}: {self.written} B written, {self.tensor.nbytes} B planned")
        self._writer._tensor_done(self._i, self._shard)


class StreamingShardWriter:
    """Appends tensors to the shards of `plans` under `folder`, each shard's in its plan's order; shards
    may be written side by side, from one thread each (merger/ordered.py does); a shard is closed
    (fsync) once complete.
    Hashes as it goes, unless `hashing` is False (the caller hashes the same bytes: merger/ordered.py)."""

    def __init__(self, folder: Path, plans: list[ShardPlan], hashing: bool = True) -> None:
        self.folder = folder
        self.plans = plans
        self.hashing = hashing
        self.sha256: dict[str, str] = {}
        self._where = {t.name: (i, k) for i, p in enumerate(plans) for k, t in enumerate(p.tensors)}
        self._open_shards: dict[int, _OpenShard] = {}
        self._complete: set[int] = set()
        self._hash_pool: ThreadPoolExecutor | None = None
        self._splice = SpliceWriter()
        self._lock = threading.Lock()  # two shards may be written from two threads: they share these

    def _shard(self, i: int) -> _OpenShard:
        shard = self._open_shards.get(i)
        if shard is None:
            shard = self._open_shards[i] = _OpenShard(self.folder, self.plans[i], self.hashing)
            self._write(shard, self.plans[i].header)
        return shard

    def _write(self, shard: _OpenShard, data) -> None:
        # sha256 runs in a second thread while this one writes the same bytes (both release the GIL);
        # it is awaited before returning, so the caller may reuse `data` at once and hashes stay in order
        view = memoryview(data).cast("B")
        hashing = None
        if shard.hash is not None and view.nbytes >= _PARALLEL_HASH_BYTES:
            hashing = self._hasher().submit(shard.hash.update, view)
        elif shard.hash is not None:
            shard.hash.update(view)
        try:
            if shard.direct is not None:
                shard.direct.write(view)
                view = view[view.nbytes:]
            elif self._splice.usable and view.nbytes >= _SPLICE_BYTES:
                try:
                    with self._lock:  # one pipe
                        self._splice.write(shard.file.fileno(), view)
                    view = view[view.nbytes:]
                except SpliceRefused:
                    pass  # refused before any byte moved: write() below, and from now on
            while view:
                n = shard.file.write(view)
                view = view[n:]
        except OSError as exc:
            raise shard.failed(exc) from exc
        finally:
            if hashing is not None:
                hashing.result()

    def _hasher(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._hash_pool is None:
                self._hash_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256")
            return self._hash_pool

    def write(self, name: str, data) -> None:
        """`data`: a bytes-like object holding exactly the planned bytes of tensor `name`."""
        self.write_parts(name, (data,))

    def write_parts(self, name: str, parts) -> None:
        """Tensor `name`'s planned bytes, given as consecutive parts (an iterable of bytes-like
        objects, each written before the next is asked for)."""
        stream = self.open_tensor(name)
        for part in parts:
            stream.write(part)
        stream.close()

    def open_tensor(self, name: str) -> "TensorStream":
        """Tensor `name`, written part by part as the caller has them (`write`, then `close`)."""
        if name not in self._where:
            raise AssertionError(f"writer has no tensor {name} planned")
        i, k = self._where[name]
        shard = self._shard(i)
        if k != shard.pos:
            expected = self.plans[i].tensors[shard.pos].name if shard.pos < len(self.plans[i].tensors) else "nothing"
            raise AssertionError(f"writer expected {expected} in {self.plans[i].filename}, got {name}")
        return TensorStream(self, i, shard, self.plans[i].tensors[k])

    def _tensor_done(self, i: int, shard: _OpenShard) -> None:
        shard.pos += 1
        if shard.pos == len(self.plans[i].tensors):
            self._finish(i)

    def _finish(self, i: int) -> None:
        digest = self._open_shards.pop(i).close()
        if digest is not None:
            self.sha256[self.plans[i].filename] = digest
        self._complete.add(i)

    def close(self) -> None:
        """Every planned tensor must have been written."""
        if not self._where:  # a model with no tensors still gets its (empty) shard
            for i in range(len(self.plans)):
                self._shard(i)
                self._finish(i)
        incomplete = [p.filename for i, p in enumerate(self.plans) if i not in self._complete]
        if incomplete:
            raise AssertionError(f"writer closed before all tensors were written: {incomplete} incomplete")
        self._stop_hasher()
        self._splice.close()

    def abort(self) -> None:
        for shard in self._open_shards.values():
            shard.abort()
        self._open_shards.clear()
        self._stop_hasher()
        self._splice.close()

    def _stop_hasher(self) -> None:
        if self._hash_pool is not None:
            self._hash_pool.shutdown(wait=True)
            self._hash_pool = None
