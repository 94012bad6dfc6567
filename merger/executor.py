"""Run a merge plan: read each base tensor through the memory map, merge it, stream it to the writer.

Memory bound: at most `depth` (2) tensors are in flight (one being written while the next is merged),
each costing its mapped source pages plus its output (merging itself works on ~2 MiB float32 chunks),
plus the adapter pages of the tasks in flight (`release`). Passthrough tensors (embeddings and
lm_head: the largest tensors of a model) are copied from the map to the output without conversion,
`SLICE_BYTES` at a time, each slice's pages dropped once written, so they cost one slice of memory
whatever their size.
The base shards' sha256 is computed by `merger.io.early`, a little ahead of this loop.
"""

from __future__ import annotations

import mmap
import threading
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from merger.core.plan import MergePlan, TensorTask
from merger.errors import NonFiniteError
from merger.io.checkpoint import DTYPE_SIZES, Checkpoint, ShardReader, TensorInfo
from merger.io.writer import StreamingShardWriter


# exponent bits of each float format: all ones means Inf or NaN
_EXPONENT = {"BF16": ("<u2", 0x7F80), "F16": ("<u2", 0x7C00), "F32": ("<u4", 0x7F800000),
             "F64": ("<u8", 0x7FF0000000000000)}


SLICE_BYTES = 64 << 20  # passthrough tensors stream from the map in slices this size


def has_nonfinite(data, dtype: str) -> bool:
    """NaN/Inf anywhere in raw little-endian float bytes (integers never are)."""
    import numpy as np

    if dtype not in _EXPONENT or not memoryview(data).nbytes:
        return False
    kind, mask = _EXPONENT[dtype]
    bits = np.frombuffer(data, dtype=kind)
    m = np.array(mask, dtype=kind)
    step = 1 << 20  # in slices, so the temporaries stay small whatever the tensor's size
    return any(bool(np.any((bits[i:i + step] & m) == m)) for i in range(0, bits.size, step))


class _BufferPool:
    """Output buffers handed back after their tensor is written, so merged tensors reuse memory
    that is already mapped (at most `depth` buffers exist)."""

    def __init__(self) -> None:
        self._free: list = []
        self._lock = threading.Lock()

    def take(self, nbytes: int):
        import torch

        with self._lock:
            for i, b in enumerate(self._free):
                if b.numel() >= nbytes:
                    return self._free.pop(i)
            if self._free:
                self._free.pop(0)  # too small: let it go, allocate a larger one
        # an anonymous map is page-aligned, so the writer can hand it to O_DIRECT without a copy
        return torch.frombuffer(mmap.mmap(-1, max(nbytes, 1)), dtype=torch.uint8)

    def give(self, buf) -> None:
        with self._lock:
            self._free.append(buf)


@dataclass(frozen=True)
class ExecutionResult:
    stats: tuple  # TensorStats of every merged tensor
    output_sha256: dict
    bytes_written: int


def execute(ckpt: Checkpoint, plan: MergePlan, writer: StreamingShardWriter, *, compute, device: str = "cpu",
            workers: int = 2, depth: int = 2,
            on_tensor: Callable[[TensorTask, int], None] = lambda task, nbytes: None,
            release: Callable[[TensorTask], None] = lambda task: None) -> ExecutionResult:
    """`release(task)` runs once the task's output is written: it lets the adapter memory it read go."""
    import torch

    from merger.core.apply import ST_TO_TORCH, run_task

    readers = {s.path: ShardReader(s.path) for s in ckpt.shards}
    stats = []
    written = 0
    buffers = _BufferPool()

    def work(task: TensorTask):
        info = ckpt.tensors[task.source]
        if task.passthrough and task.src_dtype == task.out_dtype:
            return None, None, None  # streamed straight from the map, slice by slice, by the writing loop
        view = readers[info.shard].view(info)
        if task.passthrough and has_nonfinite(view, task.src_dtype):
            raise NonFiniteError(f"base tensor {task.source} has NaN/Inf values",
                                 "the base checkpoint is broken; re-download or re-save it. Nothing was written")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # frombuffer on a read-only map: we never write to it
            base = torch.frombuffer(view, dtype=ST_TO_TORCH[task.src_dtype]) if info.nbytes else \
                torch.empty(0, dtype=ST_TO_TORCH[task.src_dtype])
        buf = buffers.take(info.numel * DTYPE_SIZES[task.out_dtype]) if task.steps else None
        out, st = run_task(task, base.reshape(task.shape), compute=compute, device=device, out_buffer=buf)
        if buf is not None and out.data_ptr() != buf.data_ptr():
            buffers.give(buf)  # not used
            buf = None
        out = out.contiguous().reshape(-1).view(torch.uint8).numpy()
        readers[info.shard].release(info.begin, info.end)  # now, not after the write
        return out, st, buf

    def passthrough_slices(task: TensorTask, info: TensorInfo):
        """The tensor's bytes from the map, checked for NaN/Inf slice by slice; each slice's pages
        are dropped once the writer has taken it."""
        reader = readers[info.shard]
        view = reader.view(info)
        for off in range(0, max(1, info.nbytes), SLICE_BYTES):
            part = view[off:off + SLICE_BYTES]
            if has_nonfinite(part, task.src_dtype):
                raise NonFiniteError(f"base tensor {task.source} has NaN/Inf values",
                                     "the base checkpoint is broken; re-download or re-save it. Nothing was written")
            yield part
            reader.release(info.begin + off, info.begin + off + len(part))

    threads = torch.get_num_threads()
    if device == "cpu":
        # the workers are the parallelism: intra-op threads on ~2 MiB chunks only add wake-ups and
        # contend with the writer and the hash threads (one thread each: -12% wall on 2 cores)
        torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="merge") as pool:
            pending: deque = deque()
            tasks = iter(plan.tasks)
            for task in tasks:
                pending.append((task, pool.submit(work, task)))
                if len(pending) >= depth:
                    break
            while pending:
                task, fut = pending.popleft()
                data, st, buf = fut.result()
                info = ckpt.tensors[task.source]
                if data is None:
                    writer.write_parts(task.name, passthrough_slices(task, info))
                else:
                    writer.write(task.name, data)
                written += info.nbytes
                if st is not None:
                    stats.append(st)
                del data
                if buf is not None:
                    buffers.give(buf)
                release(task)
                on_tensor(task, info.nbytes)
                nxt = next(tasks, None)
                if nxt is not None:
                    pending.append((nxt, pool.submit(work, nxt)))
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        torch.set_num_threads(threads)
        for r in readers.values():
            r.close()
    return ExecutionResult(tuple(stats), dict(writer.sha256), written)
