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

from merger.core import fast
from merger.core.plan import MergePlan, TensorTask
from merger.errors import NonFiniteError
from merger.io.checkpoint import DTYPE_SIZES, Checkpoint, ShardReader, TensorInfo, has_nonfinite
from merger.io.writer import StreamingShardWriter


SLICE_BYTES = 64 << 20  # passthrough tensors stream from the map in slices this size


class BufferPool:
    """Output buffers handed back after their tensor is written, so merged tensors reuse memory
    that is already mapped (at most `depth` buffers exist)."""

    def __init__(self, arrays: str = "torch") -> None:
        self._free: list = []
        self._lock = threading.Lock()
        self._arrays = arrays

    def take(self, nbytes: int):
        """A uint8 torch tensor (or numpy array) of at least `nbytes`."""
        with self._lock:
            for i, b in enumerate(self._free):
                if b.nbytes >= nbytes:
                    return self._free.pop(i)
            if self._free:
                self._free.pop(0)  # too small: let it go, allocate a larger one
        # an anonymous map is page-aligned, so the writer can hand it to O_DIRECT without a copy
        m = mmap.mmap(-1, max(nbytes, 1))
        if self._arrays == "numpy":
            import numpy as np

            return np.frombuffer(m, dtype=np.uint8)
        import torch

        return torch.frombuffer(m, dtype=torch.uint8)

    def give(self, buf) -> None:
        with self._lock:
            self._free.append(buf)


@dataclass(frozen=True)
class ExecutionResult:
    stats: tuple  # TensorStats of every merged tensor
    output_sha256: dict
    bytes_written: int


def execute(ckpt: Checkpoint, plan: MergePlan, writer: StreamingShardWriter, *, compute=None, device: str = "cpu",
            workers: int = 2, depth: int = 2,
            on_tensor: Callable[[TensorTask, int], None] = lambda task, nbytes: None,
            release: Callable[[TensorTask], None] = lambda task: None, kernel=None) -> ExecutionResult:
    """`release(task)` runs once the task's output is written: it lets the adapter memory it read go.
    `compute`: the torch dtype of the math; None with `kernel` (merger/native's): the torch-free path,
    for plans whose every task `merger.core.fast.eligible` accepts."""
    readers = {s.path: ShardReader(s.path) for s in ckpt.shards}
    stats = []
    written = 0
    buffers = BufferPool("numpy" if compute is None else "torch")

    def work(task: TensorTask):
        info = ckpt.tensors[task.source]
        if task.passthrough and task.src_dtype == task.out_dtype:
            return None, None, None  # streamed straight from the map, slice by slice, by the writing loop
        if compute is None:
            return work_numpy(task, info)
        return work_torch(task, info)

    def work_numpy(task: TensorTask, info: TensorInfo):
        import numpy as np

        from merger.core import fast

        base = np.frombuffer(readers[info.shard].view(info), dtype=np.uint16).reshape(task.shape)
        buf = buffers.take(info.nbytes)
        st = fast.plain_lora(task, base, buf[:info.nbytes].view(np.uint16).reshape(task.shape), kernel)
        readers[info.shard].release(info.begin, info.end)  # now, not after the write
        return buf[:info.nbytes], st, buf

    def work_torch(task: TensorTask, info: TensorInfo):
        import torch

        from merger.core.apply import ST_TO_TORCH, run_task

        view = readers[info.shard].view(info)
        if task.passthrough and has_nonfinite(view, task.src_dtype):
            raise NonFiniteError.in_base(task.source)
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
                raise NonFiniteError.in_base(task.source)
            yield part
            reader.release(info.begin + off, info.begin + off + len(part))

    limits = None
    if compute is None:
        if kernel is None or not all(fast.eligible(t) for t in plan.tasks):
            raise AssertionError("the torch-free path needs the native kernel and eligible tasks only")
        from threadpoolctl import threadpool_limits

        # numpy's BLAS on one thread, for the same reason as torch's below (default threads: 2x slower)
        limits = threadpool_limits(limits=1, user_api="blas")
        threads = None
    else:
        import torch

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
        if threads is not None:
            torch.set_num_threads(threads)
        if limits is not None:
            limits.restore_original_limits()
        for r in readers.values():
            r.close()
    return ExecutionResult(tuple(stats), dict(writer.sha256), written)
