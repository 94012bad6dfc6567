"""The common merge without torch: one plain LoRA on a bfloat16 tensor, float32 math, on CPU.

When every tensor of a plan is either copied unchanged or gets exactly one LoRA delta (no DoRA, no
NF4 base, no combination, no replaced tensor), bf16 in and out, and merger/native's kernel is built,
`switchyard merge` runs this and never imports torch: ~1 s of a ~3.5 s merge of a 1.1B model
(docs/benchmarks.md, Merge). The arithmetic is `merger.core.apply._plain_lora`'s with the kernel:
per ~2 MiB chunk the chunk's rows of s*B@A by one float32 GEMM (numpy's, where torch's otherwise),
then the kernel's fused add, round, compare and sums. Both GEMMs multiply the same float32 factors;
the outputs were byte-identical in the tests (tests/merger/test_fast.py) and on the 1.1B benchmark.
"""

from __future__ import annotations

import math

import numpy as np

from merger.core.plan import AddLora, TensorTask
from merger.core.stats import TensorStats, plain_lora_stats
from merger.errors import NonFiniteError

CHUNK_ELEMENTS = 1 << 19  # ~2 MiB of float32 per chunk: in cache between the passes (both paths use it)

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


def plain_lora(task: TensorTask, base: np.ndarray, out: np.ndarray, kernel) -> TensorStats:
    """`base`, `out`: the tensor's bf16 bits (uint16, the task's 2-D shape); fills `out`."""
    mod = task.steps[0].module
    A = to_float32(mod.A)
    Bs = to_float32(mod.B) * np.float32(mod.scaling)
    left, right = (A.T, Bs.T) if (mod.kind == "embedding" or mod.fan_in_fan_out) else (Bs, A)  # W += left @ right
    rows_total, cols = base.shape
    rows = max(1, CHUNK_ELEMENTS // max(1, cols))
    work = np.empty(rows * cols, dtype=np.float32)
    sums = np.zeros(2, dtype=np.float64)
    same = np.zeros(1, dtype=np.int64)
    for s in range(0, rows_total, rows):
        b = base[s:s + rows]
        d = work[: b.size].reshape(b.shape)
        np.matmul(left[s:s + rows], right, out=d)
        before = float(sums[0])
        kernel(b.ctypes.data, d.ctypes.data, out[s:s + rows].ctypes.data, b.size, sums.ctypes.data,
               same.ctypes.data)
        # float sums overflow for |x| > 1.8e19: only then pay for the exact elementwise check
        if not math.isfinite(float(sums[0]) - before) and not bool(np.isfinite(d + to_float32(b.view(BF16))).all()):
            raise NonFiniteError(f"merged tensor {task.name} has NaN/Inf values",
                                 "the adapter or base is broken (check its training run); nothing was written")
    nonzero = int((Bs != 0).any(axis=1).sum()) * int((A != 0).any(axis=0).sum())
    dnorm = math.sqrt(max(float(np.trace((Bs.T @ Bs) @ (A @ A.T))), 0.0))
    # bfloat16 in and out: the realised delta's error is the rounding error
    return plain_lora_stats(task.name, base.size, nonzero, int(same[0]), float(sums[0]), float(sums[1]),
                            float(sums[1]), dnorm)
