"""The common merge without torch: one plain LoRA on a bfloat16 tensor, float32 math, on CPU.

When every tensor of a plan is either copied unchanged or gets exactly one LoRA delta (no DoRA, no
NF4 base, no combination, no replaced tensor), bf16 in and out, and merger/native's kernel is built,
`switchyard merge` runs this and never imports torch: ~1 s of a ~3.5 s merge of a 1.1B model
(docs/benchmarks.md, Merge). The arithmetic is `merger.core.apply._plain_lora`'s, which calls `chunk`
too: per chunk of rows, merger/native's `merge_lora_bf16` builds the rows of s*B@A from the float32
factors in cache (fused multiply-adds over the rank in order, as BLAS's GEMM sums them: the same
bits, tests/merger/test_native.py), adds, rounds, compares and sums.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from merger.core.plan import AddLora, TensorTask
from merger.core.stats import TensorStats, plain_lora_stats
from merger.errors import NonFiniteError

CHUNK_ELEMENTS = 1 << 19  # elements per chunk (both paths; here 1 MiB of bf16 output, hashed in cache)
KERNEL_ROWS = 4  # merge_bf16.c's ROWS: the kernel builds this many rows of the delta at once

# adapter factors as numpy views of the file; numpy has no bfloat16, so bf16 factors are their bits,
# marked in the dtype's metadata (kept through views, slices and reshapes)
BF16 = np.dtype(np.uint16, metadata={"safetensors": "BF16"})
ST_TO_NUMPY = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": BF16, "F64": np.dtype(np.float64)}


def to_float32(a: np.ndarray) -> np.ndarray:
    """A factor as float32 (exact for bf16/f16; f64 rounds, as torch's .to(float32) does)."""
    if (a.dtype.metadata or {}).get("safetensors") == "BF16":
        return (a.astype(np.uint32) << 16).view(np.float32)  # a bf16 is the top half of a float32
    return np.asarray(a, dtype=np.float32)


def eligible(task: TensorTask) -> bool:
    """This path can produce the task's output: copied unchanged, or one plain LoRA on bf16."""
    if task.passthrough:
        return task.src_dtype == task.out_dtype
    if not (len(task.steps) == 1 and isinstance(task.steps[0], AddLora) and not task.nf4
            and task.src_dtype == task.out_dtype == "BF16" and len(task.shape) == 2):
        return False
    mod = task.steps[0].module
    return mod.magnitude is None and all(isinstance(t, np.ndarray) for t in (mod.A, mod.B))


@dataclass(frozen=True)
class Factors:
    """One task's delta as W += left @ right (float32, scaling folded in) and its chunk rows."""

    left: np.ndarray
    right: np.ndarray
    rows: int  # rows per chunk: ~CHUNK_ELEMENTS elements
    nonzero: int  # entries of the delta that are nonzero (products of nonzero rows of B and columns of A)
    dnorm: float  # ||s B A||, from the factors: s^2 tr(B^T B A A^T)


def factors(task: TensorTask) -> Factors:
    mod = task.steps[0].module
    A = to_float32(mod.A)
    Bs = to_float32(mod.B) * np.float32(mod.scaling)
    left, right = (A.T, Bs.T) if (mod.kind == "embedding" or mod.fan_in_fan_out) else (Bs, A)
    left, right = np.ascontiguousarray(left), np.ascontiguousarray(right)  # row-major, as the kernel reads them
    nonzero = int((Bs != 0).any(axis=1).sum()) * int((A != 0).any(axis=0).sum())
    dnorm = math.sqrt(max(float(np.trace((Bs.T @ Bs) @ (A @ A.T))), 0.0))
    return Factors(left, right, chunk_rows(task.shape), nonzero, dnorm)


def chunk_rows(shape: tuple[int, ...], elements: int = 0) -> int:
    """Rows per chunk of a 2-D tensor: about `elements` (CHUNK_ELEMENTS) entries, a multiple of the
    kernel's rows where that many fit (a short group takes its slower per-row loop), at least one row."""
    rows = max(1, (elements or CHUNK_ELEMENTS) // max(1, shape[1]))
    return rows - rows % KERNEL_ROWS if rows >= KERNEL_ROWS else rows


def scratch(tasks) -> np.ndarray:
    """The kernel's float32 scratch for the delta rows of any of `tasks` (reused across them)."""
    return np.empty(KERNEL_ROWS * max([1] + [t.shape[1] for t in tasks if t.steps]), dtype=np.float32)


def chunk(task: TensorTask, left: np.ndarray, right: np.ndarray, base: np.ndarray, out: np.ndarray, lo: int, hi: int,
          work: np.ndarray, kernel) -> tuple[float, float, int]:
    """Rows lo:hi of `out` = round(base + left @ right) by merger/native's `merge_lora_bf16` (`kernel`)
    -> (sum of squares of W+dW, of the rounding errors, outputs equal to the base) over those rows.
    `left`, `right`: float32, row-major; `base`, `out`: the tensor's bf16 bits; `work`: `scratch`'s."""
    b = base[lo:hi]
    rows, cols = b.shape
    sums = np.zeros(2, dtype=np.float64)
    same = np.zeros(1, dtype=np.int64)
    kernel(b.ctypes.data, left[lo:hi].ctypes.data, right.ctypes.data, right.shape[0], rows, cols,
           work.ctypes.data, out[lo:hi].ctypes.data, sums.ctypes.data, same.ctypes.data)
    # float sums overflow for |x| > 1.8e19: only then pay for the exact elementwise check
    if not math.isfinite(float(sums[0])) and \
            not bool(np.isfinite(left[lo:hi] @ right + to_float32(b.view(BF16))).all()):
        raise NonFiniteError.in_merge(task.name)
    return float(sums[0]), float(sums[1]), int(same[0])


def stats(task: TensorTask, f: Factors, w2: float, err2: float, same: int) -> TensorStats:
    """The task's rounding statistics from its chunks' totals (added in row order)."""
    # bfloat16 in and out: the realised delta's error is the rounding error
    return plain_lora_stats(task.name, math.prod(task.shape), f.nonzero, same, w2, err2, err2, f.dnorm)


def chunks(task: TensorTask, left: np.ndarray, right: np.ndarray, base: np.ndarray, out: np.ndarray, rows: int,
           kernel) -> tuple[float, float, int]:
    """`chunk` over the whole tensor, `rows` at a time -> the totals, added in row order."""
    work = scratch([task])
    w2 = err2 = 0.0
    same = 0
    for lo in range(0, base.shape[0], rows):
        a, b, c = chunk(task, left, right, base, out, lo, lo + rows, work, kernel)
        w2, err2, same = w2 + a, err2 + b, same + c
    return w2, err2, same


def plain_lora(task: TensorTask, base: np.ndarray, out: np.ndarray, kernel) -> TensorStats:
    """`base`, `out`: the tensor's bf16 bits (uint16, the task's 2-D shape); fills `out`, chunk by chunk."""
    f = factors(task)
    return stats(task, f, *chunks(task, f.left, f.right, base, out, f.rows, kernel))
