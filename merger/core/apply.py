"""Run one tensor's merge steps (pure): upcast once, add every delta in the compute dtype, round once.

Memory per call: the upcast weight, one delta and the rounded output (about 2.5x the tensor in
float32), plus the unmerged copy DoRA needs for its norms.
"""

from __future__ import annotations

import math
import threading
from typing import Optional

import numpy as np
import torch

from merger.core.combine import combine
from merger.core.lora import apply_token_rows, dora_factor, lora_bias_delta, lora_delta
from merger.core.nf4 import nf4_roundtrip
from merger.core.plan import AddLora, AddLoraBias, Combine, Replace, SetRows, TensorTask
from merger.core.fast import CHUNK_ELEMENTS, chunk_rows
from merger.core.stats import TensorStats, plain_lora_stats
from merger.errors import NonFiniteError

ST_TO_TORCH = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
               "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
               "BOOL": torch.bool}


def run_task(task: TensorTask, base: torch.Tensor, compute: torch.dtype = torch.float32,
             device: str = "cpu", out_buffer: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[TensorStats]]:
    """`base` in the task's source dtype -> (output in the task's out dtype, stats or None).

    `out_buffer` (uint8, optional) may hold the output of the common single-LoRA case; the caller
    must not reuse it before it is done with the returned tensor."""
    out_dtype = ST_TO_TORCH[task.out_dtype]
    if task.passthrough:
        return (base if base.dtype == out_dtype else base.to(out_dtype)), None
    base = base.to(device)
    if _is_plain_lora(task):
        return _plain_lora(task, base, compute, out_dtype, out_buffer)
    w_ref = base.to(compute)  # the weight as stored, for the rounding-loss statistics
    nf4_err = None
    if task.nf4:
        q_in = base.T if task.nf4_transposed else base
        rt = nf4_roundtrip(q_in)
        rt = rt.T if task.nf4_transposed else rt
        nf4_err = torch.linalg.norm((w_ref - rt.to(compute)).reshape(-1)).item()
        w0 = rt.to(compute)
    else:
        w0 = w_ref
    w = w0.clone()  # w_ref may alias the read-only map (float32 bases) and is kept for the statistics
    for step in task.steps:
        if isinstance(step, Replace):
            w = step.tensor.to(device=device, dtype=compute).clone()
        elif isinstance(step, AddLora):
            d = lora_delta(step.module, compute, device)
            if step.module.magnitude is not None:
                w = dora_factor(step.module, w0, d) * (w + d)
            else:
                w += d
            del d
        elif isinstance(step, AddLoraBias):
            w += lora_bias_delta(step.module, compute, device)
        elif isinstance(step, SetRows):
            w = apply_token_rows(w, step.rows)
        elif isinstance(step, Combine):
            deltas, weights = [], []
            for mod, wt in zip(step.modules, step.weights):
                if mod is None:
                    continue
                if step.bias:
                    deltas.append(lora_bias_delta(mod, compute, device) if mod.bias is not None
                                  else torch.zeros_like(w))
                else:
                    deltas.append(lora_delta(mod, compute, device))
                weights.append(wt)
            w += combine(step.method, deltas, weights, step.density, step.seed, task.name).to(device)
            del deltas
    if not all_finite(w):
        raise NonFiniteError.in_merge(task.name)
    out = w.to(out_dtype)
    stats = _stats(task, w_ref, w, out, nf4_err)
    return out.cpu(), stats


def _is_plain_lora(task: TensorTask) -> bool:
    return (len(task.steps) == 1 and isinstance(task.steps[0], AddLora) and task.steps[0].module.magnitude is None
            and not task.nf4)


_scratch = threading.local()


def _scratch_buffers(dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Two reusable chunk buffers per thread: allocating fresh ones for every chunk costs a page
    fault per 4 KiB (large allocations are mmapped), which dominated the merge's system time."""
    key = (dtype, str(device))
    bufs = getattr(_scratch, "bufs", {})
    if key not in bufs:
        bufs[key] = (torch.empty(CHUNK_ELEMENTS * 2, dtype=dtype, device=device),
                     torch.empty(CHUNK_ELEMENTS * 2, dtype=dtype, device=device))
        _scratch.bufs = bufs
    return bufs[key]


def _plain_lora(task: TensorTask, base: torch.Tensor, compute: torch.dtype, out_dtype: torch.dtype,
                out_buffer: Optional[torch.Tensor] = None):
    """The common case (one LoRA delta), row chunk by row chunk: each chunk is upcast, gets its rows
    of s*B@A by one addmm, is checked, rounded into the output and measured while still in cache,
    so the float32 copy of W never exists whole (memory: the output plus one chunk). bfloat16 on
    CPU: one GEMM for the chunk's delta rows, then merger/native's fused pass. The delta's
    norm comes from the factors (||s B A||^2 = s^2 tr(B^T B A A^T)); its nonzero entries are the
    products of nonzero rows of B and nonzero columns of A (exact unless entries cancel by accident)."""
    mod = task.steps[0].module
    A = mod.A.to(device=base.device, dtype=compute)
    Bs = mod.B.to(device=base.device, dtype=compute) * mod.scaling
    left, right = (A.T, Bs.T) if (mod.kind == "embedding" or mod.fan_in_fan_out) else (Bs, A)  # W += left @ right
    nbytes = base.numel() * torch.empty((), dtype=out_dtype).element_size()
    if out_buffer is not None and out_buffer.numel() >= nbytes and base.device.type == "cpu":
        out = out_buffer[:nbytes].view(out_dtype).view(base.shape)  # reused: no fresh pages to fault in
    else:
        out = torch.empty(base.shape, dtype=out_dtype, device=base.device)
    rows = chunk_rows(base.shape, CHUNK_ELEMENTS)  # the same chunks on both paths
    work, diff = _scratch_buffers(compute, base.device)
    kernel = _native_kernel(base, compute, out_dtype)
    if kernel is not None:
        w2, err2, same = _native_chunks(kernel, task, base, left, right, out, rows)
        realised2 = err2  # the kernel runs only for bfloat16 in and out
    else:
        w2, err2, same, realised2 = _torch_chunks(task, base, left, right, out, work, diff, rows, compute)
    nonzero = int((Bs != 0).any(dim=1).sum()) * int((A != 0).any(dim=0).sum())
    dnorm = float(torch.sqrt(torch.clamp(torch.trace((Bs.T @ Bs) @ (A @ A.T)), min=0)))
    if task.src_dtype == task.out_dtype:
        realised2 = err2  # then round(W) == W, so (out - W) - dW == out - (W + dW)
    return out.cpu(), plain_lora_stats(task.name, base.numel(), nonzero, same, w2, err2, realised2, dnorm)


def _torch_chunks(task: TensorTask, base: torch.Tensor, left: torch.Tensor, right: torch.Tensor, out: torch.Tensor,
                  work: torch.Tensor, diff: torch.Tensor, rows: int, compute: torch.dtype):
    """_plain_lora's loop in torch ops -> (sum of squares of W+dW, of rounding errors, outputs equal
    to the rounded base, sum of squares of the realised-minus-intended delta when dtypes differ)."""
    out_dtype = out.dtype
    err2 = w2 = realised2 = 0.0
    same = 0
    for s in range(0, base.shape[0], rows):
        b = base[s:s + rows]
        c = work[: b.numel()].view(b.shape)
        c.copy_(b)  # upcast (and a private copy: float32 bases alias the read-only map)
        c.addmm_(left[s:s + rows], right)
        c2 = _sumsq(c)
        if not math.isfinite(c2) and not bool(torch.isfinite(c).all()):
            raise NonFiniteError.in_merge(task.name)
        o = out[s:s + rows]
        o.copy_(c)
        ref = b if b.dtype == out_dtype else b.to(out_dtype)
        d = diff[: b.numel()].view(b.shape)
        same += _count_equal(o, ref, scratch=d)  # d is free until the next line
        err2 += _sumsq(d.copy_(o).sub_(c))
        w2 += c2
        if task.src_dtype != task.out_dtype:
            realised2 += _sumsq((o.to(compute) - ref.to(compute)) - (c - b.to(compute)))
    return w2, err2, same, realised2


def _native_kernel(base: torch.Tensor, compute: torch.dtype, out_dtype: torch.dtype):
    """The fused C loop (merger/native) where it applies: bfloat16 in and out, float32 math, CPU."""
    if not (base.dtype == out_dtype == torch.bfloat16 and compute == torch.float32 and base.device.type == "cpu"):
        return None
    from merger import native

    return native.merge_lora_bf16()


def _native_chunks(kernel, task: TensorTask, base: torch.Tensor, left: torch.Tensor, right: torch.Tensor,
                   out: torch.Tensor, rows: int) -> tuple[float, float, int]:
    """_plain_lora's loop with the fused kernel (merger/core/fast.py's `chunk`, on torch's memory):
    per chunk one pass that builds the delta rows from the factors in cache, adds, rounds, compares
    and measures. -> (sum of squares of W+dW, of rounding errors, equal outputs). Bit-identical outputs
    to the torch loop (tests/merger/test_native.py)."""
    from merger.core import fast

    b16 = base.contiguous().view(torch.int16).numpy().view(np.uint16)
    o16 = out.view(torch.int16).numpy().view(np.uint16)
    return fast.chunks(task, left.contiguous().numpy(), right.contiguous().numpy(), b16, o16, rows, kernel)


def _sumsq(t: torch.Tensor) -> float:
    """Sum of squares of a float32/64 tensor: BLAS's dot, about twice as fast on CPU as
    `vector_norm` (same float32 accumulation, so the same overflow for |x| > 1.8e19)."""
    flat = t.reshape(-1)
    return torch.dot(flat, flat).item()


def _count_equal(a: torch.Tensor, b: torch.Tensor, scratch: Optional[torch.Tensor] = None) -> int:
    """Bitwise-equal entries. On CPU numpy's xor + count_nonzero: one pass over the integer views
    and a SIMD count, several times faster than torch's eq + sum. `scratch` (bytes, at least
    a's size) takes the xor, so no temporary is allocated (fresh pages cost more than the xor)."""
    if a.is_cuda:
        return int((a == b).sum())
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    x, y = a.contiguous().view(ints).numpy().reshape(-1), b.contiguous().view(ints).numpy().reshape(-1)
    nbytes = x.size * x.itemsize
    out = scratch.reshape(-1).view(torch.uint8)[:nbytes].view(ints).numpy() if \
        scratch is not None and scratch.numel() * scratch.element_size() >= nbytes else None
    return a.numel() - int(np.count_nonzero(np.bitwise_xor(x, y, out=out)))


def all_finite(t: torch.Tensor) -> bool:
    # the norm is inf/nan whenever an entry is; only then pay for the exact elementwise check
    if bool(torch.isfinite(torch.linalg.vector_norm(t))):
        return True
    return bool(torch.isfinite(t).all())


def _stats(task: TensorTask, w_ref: torch.Tensor, w: torch.Tensor, out: torch.Tensor,
           nf4_err: Optional[float]) -> TensorStats:
    norm = torch.linalg.vector_norm
    delta = w - w_ref
    numel = w.numel()
    nonzero = numel - _count_equal(w, w_ref)
    ref_out = w_ref.to(out.dtype)
    # entries with a zero delta always round like the base, so they are all among the equal ones
    vanished = _count_equal(out, ref_out) - (numel - nonzero)
    out_c = out.to(w.dtype)
    err = norm(out_c - w).item()
    if task.src_dtype == task.out_dtype:  # then round(w_ref) == w_ref exactly
        realised = err  # (out - w_ref) - (w - w_ref) == out - w
    else:
        realised = norm((out_c - ref_out.to(w.dtype)) - delta).item()
    dnorm, wnorm = norm(delta).item(), norm(w).item()
    return TensorStats(task.name, numel, nonzero, vanished,
                       err / wnorm if wnorm else 0.0, realised / dnorm if dnorm else 0.0,
                       (nf4_err / dnorm if dnorm else float("inf")) if nf4_err is not None else None)
