"""The torch-free merge's executor: both workers share every tensor chunk by chunk, and each chunk's
output is hashed by the worker that computed it, in file order, while it is still in its core's cache.

Why: with torch gone (merger/core/fast.py) the output's sha256 (provenance) bounds the merge: one
stream per shard, ~1.9 GB/s of one core at best here. Hashed by a thread of its own, each tensor is
read back from memory (1.2 GB/s on the benchmark VM); here the chunk just computed is hashed by the
core that computed it, and the turn to hash passes from worker to worker inside merger/native's
`hash_in_turn` (an atomic counter, spun on without the GIL), since a turn passed through Python
(condition variable, GIL) cost ~80 us per 1 MiB chunk, a third of the hash itself. The hash contexts
are OpenSSL's (merger/io/sha256_ctx.py), so that C can update them. The main thread writes each
tensor once all of it is hashed (merger/io/writer.py, O_DIRECT where it can), so the disk works
beside both workers. docs/benchmarks.md (Merge, eleventh session) has the measurements.

Memory: at most `depth` merged tensors' outputs exist (a worker that needs another waits until the
writer hands one back); copied tensors are checked, hashed and written from the map in slices whose
pages are dropped once written.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from merger.core import fast
from merger.core.plan import MergePlan, TensorTask
from merger.errors import NonFiniteError
from merger.executor import BufferPool, ExecutionResult
from merger.io.checkpoint import Checkpoint, ShardReader, has_nonfinite
from merger.io.sha256_ctx import Sha256Lib
from merger.io.writer import ShardPlan, StreamingShardWriter

SLICE_BYTES = 8 << 20  # copied tensors are checked, hashed and written in slices this size
IN_FLIGHT_BYTES = 256 << 20  # merged outputs held at once: 2 to 4 tensors, as their size allows
MIN_DEPTH, MAX_DEPTH = 2, 4  # 4 against 2: -0.1 s on the 1.1B shape (workers waited for the writer)


@dataclass(frozen=True)
class Unit:
    """One step of the pass, in file order: a shard's header (task -1), rows lo:hi of a merged
    tensor, or bytes lo:hi of a copied one."""

    shard: int
    task: int
    lo: int
    hi: int


def units(tasks: list[TensorTask], nbytes: list[int], shards: list[ShardPlan]) -> list[Unit]:
    """Every step of writing `shards`, whose tensors are `tasks` in order (`nbytes`: each one's size)."""
    out: list[Unit] = []
    i = 0
    for s, shard in enumerate(shards):
        out.append(Unit(s, -1, 0, 0))
        for planned in shard.tensors:
            task = tasks[i]
            if planned.name != task.name:
                raise AssertionError(f"shard plan has {planned.name} where the merge plan has {task.name}")
            if task.steps:
                rows, step = task.shape[0], fast.chunk_rows(task.shape)
                out += [Unit(s, i, lo, min(lo + step, rows)) for lo in range(0, max(1, rows), step)]
            else:
                out += [Unit(s, i, lo, min(lo + SLICE_BYTES, nbytes[i]))
                        for lo in range(0, max(1, nbytes[i]), SLICE_BYTES)]
            i += 1
    if i != len(tasks):
        raise AssertionError(f"shard plans hold {i} of the merge plan's {len(tasks)} tensors")
    return out


def depth_for(largest: int) -> int:
    """Merged tensors in flight, given the largest one's bytes (pure)."""
    return max(MIN_DEPTH, min(MAX_DEPTH, IN_FLIGHT_BYTES // max(1, largest)))


class _Tensor:
    """A tensor in flight: its base bytes in the map and, when merged, its output."""

    def __init__(self, view: memoryview) -> None:
        self.view = view
        self.base = self.out = self.buf = None
        self.factors: Optional[fast.Factors] = None


class _Pass:
    def __init__(self, ckpt: Checkpoint, plan: MergePlan, writer: StreamingShardWriter, kernel, in_turn,
                 sha: Sha256Lib, depth: int) -> None:
        self.tasks, self.writer, self.kernel, self.in_turn = list(plan.tasks), writer, kernel, in_turn
        self.readers = {s.path: ShardReader(s.path) for s in ckpt.shards}
        self.infos = [ckpt.tensors[t.source] for t in self.tasks]
        self.steps = units(self.tasks, [i.nbytes for i in self.infos], writer.plans)
        self.first: dict[int, int] = {}
        self.last: dict[int, int] = {}
        for k, u in enumerate(self.steps):
            self.first.setdefault(u.task, k)
            self.last[u.task] = k
        self.hashes = [sha.new() for _ in writer.plans]
        self.update = sha.update_address
        self.headers = [np.frombuffer(p.header, dtype=np.uint8) for p in writer.plans]
        self.turn = np.zeros(2, dtype=np.int64)  # [the next step to hash, abort]: updated from C
        self.sums: list = [None] * len(self.steps)  # each merged step's (w2, err2, same)
        # what the main thread waits for: each tensor's last step, every step of a copied one
        self.hashed = {k: threading.Event() for k in set(self.last.values()) | {
            k for k, u in enumerate(self.steps) if u.task >= 0 and not self.tasks[u.task].steps}}
        self.live: dict[int, _Tensor] = {}
        self.buffers = BufferPool("numpy")
        self.slots = threading.Semaphore(depth)
        self.take = threading.Lock()  # hands out steps in order
        self.next = 0
        self.error: Optional[BaseException] = None
        self.failing = threading.Lock()

    # workers ---------------------------------------------------------------------------------
    def work(self) -> None:
        scratch = fast.scratch(self.tasks)
        try:
            while True:
                with self.take:
                    if self.error is not None or self.next == len(self.steps):
                        return
                    k = self.next
                    self.next += 1
                    u = self.steps[k]
                    t = self._tensor(u, k)
                data = self._compute(k, u, t, scratch)
                rc = self.in_turn(data.ctypes.data, data.nbytes, self.turn.ctypes.data, k, self.update,
                                  self.hashes[u.shard].address)
                if rc == -1:
                    return  # another thread failed
                if rc != 0:
                    raise OSError("OpenSSL's EVP_DigestUpdate failed while hashing the output")
                if t is not None and t.factors is not None and k == self.last[u.task]:
                    info = self.infos[u.task]
                    self.readers[info.shard].release(info.begin, info.end)  # read in full: now, not after the write
                if k in self.hashed:
                    self.hashed[k].set()
        except BaseException as exc:
            self.fail(exc)

    def _tensor(self, u: Unit, k: int) -> Optional[_Tensor]:
        """The step's tensor, set up by its first step (under `take`, so in order)."""
        if u.task < 0:
            return None
        if k != self.first[u.task]:
            return self.live[u.task]
        task, info = self.tasks[u.task], self.infos[u.task]
        t = _Tensor(self.readers[info.shard].view(info))
        if task.steps:
            # the writer hands a slot back after each write; the other worker never needs `take` for that
            while not self.slots.acquire(timeout=0.05):
                if self.error is not None:
                    raise RuntimeError("merge stopped")
            t.buf = self.buffers.take(info.nbytes)
            t.base = np.frombuffer(t.view, dtype=np.uint16).reshape(task.shape)
            t.out = t.buf[:info.nbytes].view(np.uint16).reshape(task.shape)
            t.factors = fast.factors(task)
        self.live[u.task] = t
        return t

    def _compute(self, k: int, u: Unit, t: Optional[_Tensor], scratch: np.ndarray) -> np.ndarray:
        """The step's output bytes (computed, or checked) as a uint8 array."""
        if t is None:
            return self.headers[u.shard]
        task = self.tasks[u.task]
        if t.factors is None:  # copied: checked here, hashed in turn, written by the main thread
            part = t.view[u.lo:u.hi]
            if has_nonfinite(part, task.src_dtype):
                raise NonFiniteError.in_base(task.source)
            return np.frombuffer(part, dtype=np.uint8)
        f = t.factors
        self.sums[k] = fast.chunk(task, f.left, f.right, t.base, t.out, u.lo, u.hi, scratch, self.kernel)
        return t.out[u.lo:u.hi].reshape(-1).view(np.uint8)

    def fail(self, exc: BaseException) -> None:
        # not under `take`: a worker may hold it while it waits for a slot
        with self.failing:
            if self.error is None:
                self.error = exc
        self.turn[1] = 1  # workers waiting in hash_in_turn return
        for e in self.hashed.values():
            e.set()

    # the main thread -------------------------------------------------------------------------
    def _until_hashed(self, k: int) -> None:
        self.hashed[k].wait()
        if self.error is not None:
            raise self.error

    def _slices(self, i: int):
        t = None
        info = self.infos[i]
        for k in range(self.first[i], self.last[i] + 1):
            self._until_hashed(k)
            t = t or self.live[i]
            u = self.steps[k]
            yield t.view[u.lo:u.hi]
            self.readers[info.shard].release(info.begin + u.lo, info.begin + u.hi)

    def write(self, i: int):
        """Write tensor i once hashed -> its stats (None when copied)."""
        task = self.tasks[i]
        if not task.steps:
            self.writer.write_parts(task.name, self._slices(i))
            self.live.pop(i, None)
            return None
        self._until_hashed(self.last[i])
        # not under `take`: a worker may hold it while it waits for the slot this write gives back
        # (one dict operation, atomic; the worker added the entry before the tensor's first hash)
        t = self.live.pop(i)
        self.writer.write(task.name, t.buf[:self.infos[i].nbytes])
        self.buffers.give(t.buf)
        self.slots.release()
        w2 = err2 = 0.0
        same = 0
        for k in range(self.first[i], self.last[i] + 1):  # in row order: the same totals as one loop
            a, b, c = self.sums[k]
            w2, err2, same = w2 + a, err2 + b, same + c
        return fast.stats(task, t.factors, w2, err2, same)

    def close(self) -> dict[str, str]:
        for r in self.readers.values():
            r.close()
        return {p.filename: h.hexdigest() for p, h in zip(self.writer.plans, self.hashes)}


def execute(ckpt: Checkpoint, plan: MergePlan, writer: StreamingShardWriter, *, kernel, in_turn, sha: Sha256Lib,
            workers: int = 2, depth: Optional[int] = None,
            on_tensor: Callable[[TensorTask, int], None] = lambda task, nbytes: None,
            release: Callable[[TensorTask], None] = lambda task: None) -> ExecutionResult:
    """Run `plan` (every task `fast.eligible`) with merger/native's `kernel` (merge_lora_bf16) and
    `in_turn` (hash_in_turn); `writer` must not hash (`hashing=False`): the output's sha256 is computed
    here. `release(task)` runs once the task's output is written."""
    if kernel is None or in_turn is None or writer.hashing or not all(fast.eligible(t) for t in plan.tasks):
        raise AssertionError("the ordered pass needs the native kernels, eligible tasks and a writer that does not hash")
    from threadpoolctl import threadpool_limits

    if depth is None:
        depth = depth_for(max([ckpt.tensors[t.source].nbytes for t in plan.tasks if t.steps], default=0))
    p = _Pass(ckpt, plan, writer, kernel, in_turn, sha, depth)
    stats = []
    written = 0
    # numpy's BLAS on one thread for the factors' small products: the workers are the parallelism
    limits = threadpool_limits(limits=1, user_api="blas")
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="merge") as pool:
            running = [pool.submit(p.work) for _ in range(workers)]
            try:
                for i, task in enumerate(p.tasks):
                    st = p.write(i)
                    if st is not None:
                        stats.append(st)
                    written += p.infos[i].nbytes
                    release(task)
                    on_tensor(task, p.infos[i].nbytes)
                writer.close()
            except BaseException as exc:
                p.fail(exc)
                raise
            finally:
                for f in running:
                    f.result()
    except BaseException:
        writer.abort()
        raise
    finally:
        limits.restore_original_limits()
        digests = p.close()
    return ExecutionResult(tuple(stats), digests, written)
