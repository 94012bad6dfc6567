"""The torch-free merge's executor: each chunk's output is hashed by the worker that computed it, in
file order, while it is still in its core's cache; shards are hashed, and written, side by side.

Why: with torch gone (merger/core/fast.py) the output's sha256 (provenance) bounds the merge: one
stream per shard, ~1.8 GB/s of one core at best here. Hashed by a thread of its own, each tensor is
read back from memory (1.2 GB/s on the benchmark VM); here the chunk just computed is hashed by the
core that computed it: row group by row group inside the kernel (merger/native's
`merge_lora_bf16_in_turn`) when the worker is the only one on its shard, else once computed, the turn
passing from worker to worker inside `hash_in_turn` (an atomic counter, spun on without the GIL),
since a turn passed through Python (condition variable, GIL) cost ~80 us per 1 MiB chunk, a third of
the hash itself. Each worker keeps to a shard of its own while there is one (`_Pass._lane`; the
writer balances shard sizes for that), so the two sha256 streams run on both cores; the last shard
is shared. The hash contexts are OpenSSL's (merger/io/sha256_ctx.py), so that C can update them.
Two writer threads write each tensor once hashed (merger/io/writer.py, O_DIRECT where it can), one
shard each, so the disk works beside both workers with two writes in flight. docs/benchmarks.md
(Merge, eleventh and twelfth sessions) has the measurements.

Memory: what is hashed and not yet written (merged outputs, whole; copied tensors' slices, checked
and hashed in the map, whose pages are dropped once written) stays within a byte budget of `depth`
merged tensors (`depth_for`); a worker that needs more waits, outside the step lock, for the writers,
which are only ever handed what is hashed, so they never wait for a worker.
"""

from __future__ import annotations

import mmap
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from merger.core import fast
from merger.core.plan import MergePlan, TensorTask
from merger.errors import NonFiniteError
from merger.executor import ExecutionResult
from merger.io.checkpoint import Checkpoint, ShardReader, has_nonfinite
from merger.io.sha256_ctx import Sha256Lib
from merger.io.writer import ShardPlan, StreamingShardWriter, TensorStream

SLICE_BYTES = 8 << 20  # copied tensors are checked, hashed and written in slices this size
IN_FLIGHT_BYTES = 512 << 20  # merged outputs held at once, 2 to MAX_DEPTH tensors: 512 against 256 MB
# took the 8B shape from 16.6-19.6 s to 12.6-13.6 s (4 tensors in flight instead of 2), 310 -> 535 MB
WRITERS = 2  # threads writing shards side by side
# two lanes (a shard each) share the budget: 6 or 8 against 4 was -0.1 to -0.2 s on the 1.1B shape
# (workers waited for the writers; 6 and 8 alike once copied slices counted), 4 against 2 -0.1 s
# before there were lanes
MIN_DEPTH, MAX_DEPTH = 2, 6


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


def depth_for(largest: int, largest_any: int = 0) -> int:
    """Merged tensors in flight, given the largest one's bytes and the largest tensor's in the model
    (pure). Within IN_FLIGHT_BYTES, and within the merge's memory bound (2 x the largest tensor + the
    adapter + the interpreter): beside the outputs in flight, each worker holds at most one merged
    tensor's base pages (dropped once it is hashed), so depth + 2 merged tensors fit in 2 x the largest."""
    largest = max(1, largest)
    fits = 2 * max(largest_any, largest) // largest - 2
    return max(MIN_DEPTH, min(MAX_DEPTH, IN_FLIGHT_BYTES // largest, fits))


class _Memory:
    """What the pass holds between its workers and its writers, within `total` bytes: merged outputs
    (in flight, or kept for a later tensor of the same size: fresh pages cost a fault and a zeroing
    each) and copied slices in flight. A kept buffer that is in the way is let go; one request larger
    than `total` is let through when nothing else is held."""

    def __init__(self, total: int) -> None:
        self.total, self.used = total, 0
        self._kept: dict[int, list] = {}  # nbytes -> buffers (counted in `used`)
        self._cond = threading.Condition()

    def buffer(self, n: int) -> Optional[np.ndarray]:
        """An output buffer of n bytes (page-aligned, for O_DIRECT), or None while it does not fit."""
        with self._cond:
            if self._kept.get(n):
                return self._kept[n].pop()
            if not self._fits(n):
                return None
            self.used += n
        return np.frombuffer(mmap.mmap(-1, max(n, 1)), dtype=np.uint8)

    def take(self, n: int) -> bool:
        with self._cond:
            if not self._fits(n):
                return False
            self.used += n
            return True

    def _fits(self, n: int) -> bool:
        while self.used and self.used + n > self.total:
            size = next((size for size, bufs in self._kept.items() if bufs), None)
            if size is None:
                return False
            self._kept[size].pop()  # unmapped with its last reference
            self.used -= size
        return True

    def keep(self, buf: np.ndarray) -> None:
        """A merged output, written: kept for reuse."""
        with self._cond:
            self._kept.setdefault(buf.nbytes, []).append(buf)
            self._cond.notify_all()

    def give(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()

    def wait(self, timeout: float) -> None:
        with self._cond:
            self._cond.wait(timeout)


class _Tensor:
    """A tensor in flight: its base bytes in the map and, when merged, its output."""

    def __init__(self, view: memoryview) -> None:
        self.view = view
        self.base = self.out = self.buf = None
        self.factors: Optional[fast.Factors] = None


class _Pass:
    def __init__(self, ckpt: Checkpoint, plan: MergePlan, writer: StreamingShardWriter, kernel, in_turn, fused,
                 sha: Sha256Lib, budget: int) -> None:
        self.tasks, self.writer, self.kernel, self.in_turn, self.fused = list(plan.tasks), writer, kernel, in_turn, fused
        self.readers = {s.path: ShardReader(s.path) for s in ckpt.shards}
        self.infos = [ckpt.tensors[t.source] for t in self.tasks]
        self.steps = units(self.tasks, [i.nbytes for i in self.infos], writer.plans)
        n = len(writer.plans)
        self.first: dict[int, int] = {}
        self.last: dict[int, int] = {}
        self.start, self.end = [0] * n, [0] * n  # each shard's steps: start..end-1, header first
        for k, u in enumerate(self.steps):
            if u.task < 0:
                self.start[u.shard] = k
            else:
                self.first.setdefault(u.task, k)
                self.last[u.task] = k
            self.end[u.shard] = k + 1
        # what the writers write, each shard's in file order, named by a step: a merged tensor's last
        # step (all of it), or each step of a copied one (that slice)
        self.order: list[list[int]] = [[] for _ in range(n)]
        for k, u in enumerate(self.steps):
            if u.task >= 0 and (k == self.last[u.task] or not self.tasks[u.task].steps):
                self.order[u.shard].append(k)
        self.hashes = [sha.new() for _ in writer.plans]
        self.update = sha.update_address
        self.headers = [np.frombuffer(p.header, dtype=np.uint8) for p in writer.plans]
        # per shard, updated from C: [its next step to hash, counted from its header; abort]
        self.turns = np.zeros((n, 2), dtype=np.int64)
        self.sums: list = [None] * len(self.steps)  # each merged step's (w2, err2, same)
        self.left = {i: self.last[i] - self.first[i] + 1 for i in self.first if self.tasks[i].steps}  # steps to finish
        self.counting = threading.Lock()
        # to the main thread: a write unit hashed (its step), a tensor written ((index, stats)), or None: failed
        self.ready: queue.SimpleQueue = queue.SimpleQueue()
        # to the writer threads: shard s's units to lanes[s % WRITERS], in order, so two shards are
        # written side by side (2.2 GB in 1.23-1.30 s by two `dd oflag=direct`, 1.44-1.50 s by one).
        # A writer never waits for a worker (it is handed only what is hashed), so workers waiting
        # for the budget always get it back.
        self.lanes = [queue.SimpleQueue() for _ in range(WRITERS)]
        self.streams: dict[int, TensorStream] = {}  # copied tensors being written, slice by slice
        self.live: dict[int, _Tensor] = {}
        self.memory = _Memory(budget)
        self.take = threading.Lock()  # hands out steps, each shard's in order
        self.next = list(self.start)  # each shard's next step to hand out
        self.on = [0] * n  # workers on each shard
        self.error: Optional[BaseException] = None
        self.failing = threading.Lock()

    # workers ---------------------------------------------------------------------------------
    def _lane(self, mine: Optional[int]) -> Optional[int]:
        """The shard a worker takes its next step from (under `take`): its own while it has steps; else
        the first one no worker is on, so that shards are hashed side by side (one sha256 stream each);
        else the one with most steps left, shared turn by turn."""
        if mine is not None and self.next[mine] < self.end[mine]:
            return mine
        left = [s for s in range(len(self.next)) if self.next[s] < self.end[s]]
        if not left:
            return None
        idle = [s for s in left if self.on[s] == 0]
        return idle[0] if idle else max(left, key=lambda s: self.end[s] - self.next[s])

    def work(self) -> None:
        scratch = fast.scratch(self.tasks)
        mine: Optional[int] = None
        try:
            while True:
                with self.take:
                    if self.error is not None:
                        return
                    s = self._lane(mine)
                    if s != mine:
                        if mine is not None:
                            self.on[mine] -= 1
                        if s is not None:
                            self.on[s] += 1
                        mine = s
                    if s is None:
                        return
                    k = self.next[s]
                    u = self.steps[k]
                    buf = None
                    if u.task >= 0 and k == self.first[u.task] and self.tasks[u.task].steps:
                        buf = self.memory.buffer(self.infos[u.task].nbytes)
                        room = buf is not None
                    else:
                        room = u.task < 0 or bool(self.tasks[u.task].steps) or self.memory.take(u.hi - u.lo)
                    if not room:
                        k = -1  # wait for the writers outside `take`: the other worker goes on meanwhile
                    else:
                        self.next[s] += 1
                        t = self._tensor(u, k, buf)
                if k < 0:
                    self.memory.wait(0.05)
                    continue
                rc = self._step(k, u, t, s, scratch)
                if rc == -1:
                    return  # another thread failed
                if rc != 0:
                    raise OSError("OpenSSL's EVP_DigestUpdate failed while hashing the output")
                if u.task < 0:
                    continue
                if t.factors is not None:
                    # its base rows are read: their pages go now, not with the tensor (each worker on
                    # a tensor of its own held two 117 MB tensors' pages on the 8B shape). Rounded out
                    # to whole pages: a neighbour's page the other worker still reads comes back
                    # from the page cache.
                    info, row = self.infos[u.task], self.infos[u.task].nbytes // max(1, self.tasks[u.task].shape[0])
                    self.readers[info.shard].release(info.begin + u.lo * row, info.begin + u.hi * row)
                    # the step that finishes a tensor, not its last: the turn may pass on (in C)
                    # before the previous step's worker has stored its sums
                    with self.counting:
                        self.left[u.task] -= 1
                        finished = not self.left[u.task]
                    if finished:
                        self.readers[info.shard].release(info.begin, info.end)  # pages faulted back in
                        self.ready.put(self.last[u.task])
                else:
                    self.ready.put(k)
        except BaseException as exc:
            self.fail(exc)

    def _tensor(self, u: Unit, k: int, buf: Optional[np.ndarray]) -> Optional[_Tensor]:
        """The step's tensor, set up by its first step (under `take`, so before its other steps);
        `buf`: a merged tensor's output buffer."""
        if u.task < 0:
            return None
        if k != self.first[u.task]:
            return self.live[u.task]
        task, info = self.tasks[u.task], self.infos[u.task]
        t = _Tensor(self.readers[info.shard].view(info))
        if task.steps:
            t.buf = buf
            t.base = np.frombuffer(t.view, dtype=np.uint16).reshape(task.shape)
            t.out = t.buf[:info.nbytes].view(np.uint16).reshape(task.shape)
            t.factors = fast.factors(task)
        self.live[u.task] = t
        return t

    def _step(self, k: int, u: Unit, t: Optional[_Tensor], s: int, scratch: np.ndarray) -> int:
        """Compute (or check) step k's output and hash it in its shard's turn -> hash_in_turn's code."""
        turn, pos, ctx = self.turns[s].ctypes.data, k - self.start[s], self.hashes[s].address
        if t is None:  # the shard's header
            data = self.headers[u.shard]
        elif t.factors is None:  # copied: checked here, hashed in turn, written by a writer thread
            task = self.tasks[u.task]
            part = t.view[u.lo:u.hi]
            if has_nonfinite(part, task.src_dtype):
                raise NonFiniteError.in_base(task.source)
            data = np.frombuffer(part, dtype=np.uint8)
        else:
            f, rc = t.factors, 0
            if self.fused is not None:  # computed and hashed in one call: in cache, when the turn is ours

                def kernel(*args):
                    nonlocal rc
                    rc = self.fused(*args, turn, pos, self.update, ctx)
            else:
                kernel = self.kernel
            self.sums[k] = fast.chunk(self.tasks[u.task], f.left, f.right, t.base, t.out, u.lo, u.hi, scratch, kernel)
            if self.fused is not None:
                return rc
            data = t.out[u.lo:u.hi].reshape(-1).view(np.uint8)
        return self.in_turn(data.ctypes.data, data.nbytes, turn, pos, self.update, ctx)

    def fail(self, exc: BaseException) -> None:
        # not under `take`: a worker may hold it
        with self.failing:
            if self.error is None:
                self.error = exc
        self.turns[:, 1] = 1  # workers waiting in hash_in_turn return
        self.ready.put(None)
        self.stop_writing()

    # the main thread and the writer threads ------------------------------------------------
    def written(self):
        """Hand each write unit, once hashed, to a writer thread (each shard's in order, to one thread)
        -> yields (tensor index, its stats or None when copied) as each tensor is written."""
        ready: set[int] = set()
        pos = [0] * len(self.order)
        done = 0
        while done < len(self.tasks):
            item = self.ready.get()
            if item is None:
                raise self.error
            if isinstance(item, tuple):  # (index, stats): written
                done += 1
                yield item
                continue
            ready.add(item)
            s = self.steps[item].shard
            while pos[s] < len(self.order[s]) and self.order[s][pos[s]] in ready:
                k = self.order[s][pos[s]]
                pos[s] += 1
                ready.discard(k)
                self.lanes[s % len(self.lanes)].put(k)

    def write_lane(self, lane: queue.SimpleQueue) -> None:
        """A writer thread: writes the units it is handed until it gets None."""
        try:
            while (k := lane.get()) is not None:
                i = self.steps[k].task
                if self.tasks[i].steps:
                    self.ready.put((i, self.write(i)))
                elif self._write_slice(k, i):
                    self.ready.put((i, None))
        except BaseException as exc:
            self.fail(exc)

    def stop_writing(self) -> None:
        for lane in self.lanes:
            lane.put(None)

    def _write_slice(self, k: int, i: int) -> bool:
        """Write copied tensor i's slice (step k) -> whether that was the tensor's last."""
        u, info = self.steps[k], self.infos[i]
        if k == self.first[i]:
            self.streams[i] = self.writer.open_tensor(self.tasks[i].name)
        self.streams[i].write(self.live[i].view[u.lo:u.hi])
        self.readers[info.shard].release(info.begin + u.lo, info.begin + u.hi)
        self.memory.give(u.hi - u.lo)
        if k != self.last[i]:
            return False
        self.streams.pop(i).close()
        self.live.pop(i, None)
        return True

    def write(self, i: int):
        """Write merged tensor i, all of it hashed -> its stats."""
        task = self.tasks[i]
        # one dict operation, atomic; the worker added the entry (under `take`) before the first hash
        t = self.live.pop(i)
        self.writer.write(task.name, t.buf[:self.infos[i].nbytes])
        self.memory.keep(t.buf)
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
            fused=None, workers: int = 2, depth: Optional[int] = None,
            on_tensor: Callable[[TensorTask, int], None] = lambda task, nbytes: None,
            release: Callable[[TensorTask], None] = lambda task: None) -> ExecutionResult:
    """Run `plan` (every task `fast.eligible`) with merger/native's `kernel` (merge_lora_bf16) and
    `in_turn` (hash_in_turn), or `fused` (merge_lora_bf16_in_turn: both in one) where given; `writer`
    must not hash (`hashing=False`): the output's sha256 is computed here. `release(task)` runs once
    the task's output is written."""
    if kernel is None or in_turn is None or writer.hashing or not all(fast.eligible(t) for t in plan.tasks):
        raise AssertionError("the ordered pass needs the native kernels, eligible tasks and a writer that does not hash")
    from threadpoolctl import threadpool_limits

    largest = max([ckpt.tensors[t.source].nbytes for t in plan.tasks if t.steps], default=0)
    if depth is None:
        depth = depth_for(largest, max([ckpt.tensors[t.source].nbytes for t in plan.tasks], default=0))
    p = _Pass(ckpt, plan, writer, kernel, in_turn, fused, sha, max(depth * largest, 2 * SLICE_BYTES))
    stats = []
    written = 0
    # numpy's BLAS on one thread for the factors' small products: the workers are the parallelism
    limits = threadpool_limits(limits=1, user_api="blas")
    try:
        with ThreadPoolExecutor(max_workers=workers + WRITERS, thread_name_prefix="merge") as pool:
            running = [pool.submit(p.work) for _ in range(workers)] + [pool.submit(p.write_lane, q) for q in p.lanes]
            try:
                for i, st in p.written():
                    if st is not None:
                        stats.append((i, st))
                    written += p.infos[i].nbytes
                    release(p.tasks[i])
                    on_tensor(p.tasks[i], p.infos[i].nbytes)
                p.stop_writing()
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
    return ExecutionResult(tuple(st for _, st in sorted(stats, key=lambda x: x[0])), digests, written)
