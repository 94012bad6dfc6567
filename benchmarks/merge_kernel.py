"""One-thread timings behind the merge kernel's design (docs/benchmarks.md, Merge, ninth to eleventh sessions).

1. The single-LoRA chunk loop per 1.1 G elements: torch's six passes one by one, and the rank-16 GEMM
   plus merger/native's fused pass (2^19-element chunk, in cache, timed in a loop).
2. A whole 5632 x 2048 bf16 tensor, GEMM + kernel, by chunk size.
3. sha256: one 1 MiB buffer hashed over and over, and a 23 MB tensor; then the tensor's merge followed
   by its hash against each chunk hashed right after the kernel wrote it, by chunk size.
4. Each chunk hashed by a second thread right behind the one that wrote it (at most 4 chunks behind),
   against the same thread: the hash's rate on bytes another core just wrote.
5. The kernel that builds the delta from the LoRA factors itself (`merge_lora_bf16`, eleventh session)
   against the GEMM + kernel it replaced, on that tensor and per 1.1 G elements, and their outputs compared.

    .venv/bin/python benchmarks/merge_kernel.py
"""

from __future__ import annotations

import ctypes
import hashlib
import queue
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from merger import native  # noqa: E402
from merger.core.apply import _count_equal, _sumsq  # noqa: E402

PER = 1.1e9  # report seconds per this many elements (about the 1.1B model's merged weights)


def per_call(fn, n: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def main() -> None:
    torch.set_num_threads(1)
    kernel = native.merge_bf16()
    if kernel is None:
        raise SystemExit(f"no native kernel: {native.last_error}")
    sums, same = np.zeros(2), np.zeros(1, dtype=np.int64)

    def run_kernel(b, d, o):
        kernel(b.data_ptr(), d.data_ptr(), o.data_ptr(), b.numel(), sums.ctypes.data, same.ctypes.data)

    chunk, cols = 1 << 19, 2048
    rows = chunk // cols
    b = torch.randn(rows, cols).to(torch.bfloat16)
    c, d = torch.empty(rows, cols), torch.empty(rows, cols)
    o = torch.empty(rows, cols, dtype=torch.bfloat16)
    L, R = torch.randn(rows, 16) * 0.01, torch.randn(16, cols) * 0.1
    print("1. chunk loop, seconds per 1.1 G elements (one thread)")
    passes = {"upcast": lambda: c.copy_(b), "addmm": lambda: c.addmm_(L, R), "sum of squares": lambda: _sumsq(c),
              "round": lambda: o.copy_(c), "compare": lambda: _count_equal(o, b, scratch=d),
              "error": lambda: _sumsq(d.copy_(o).sub_(c))}
    total = 0.0
    for name, fn in passes.items():
        t = per_call(fn, 200) * PER / chunk
        total += t
        print(f"   torch {name:15s} {t:.2f}")
    print(f"   torch, all six     {total:.2f}")
    gemm = per_call(lambda: torch.mm(L, R, out=c), 200) * PER / chunk
    fused = per_call(lambda: run_kernel(b, c, o), 200) * PER / chunk
    print(f"   GEMM {gemm:.2f} + kernel {fused:.2f} = {gemm + fused:.2f}")

    R0 = 5632
    base = torch.randn(R0, cols).to(torch.bfloat16)
    Lw = torch.randn(R0, 16) * 0.01
    out = torch.empty(R0, cols, dtype=torch.bfloat16)
    out_bytes = out.view(-1).view(torch.uint8).numpy()

    def merge_tensor(chunk_elems: int, h=None):
        r = chunk_elems // cols
        scratch = torch.empty(r * cols)
        for s in range(0, R0, r):
            bs = base[s:s + r]
            ds = scratch[:bs.numel()].view(bs.shape)
            torch.mm(Lw[s:s + r], R, out=ds)
            run_kernel(bs, ds, out[s:s + r])
            if h is not None:
                h.update(out[s:s + r].reshape(-1).view(torch.uint8).numpy())

    print(f"2. a {R0} x {cols} tensor, GEMM + kernel, ms by chunk size")
    for k in (17, 18, 19, 20, 21):
        print(f"   2^{k}: {per_call(lambda: merge_tensor(1 << k), 20) * 1e3:.1f}")

    print("3. sha256")
    mib = bytes(1 << 20)
    t = per_call(lambda: hashlib.sha256(mib), 500)
    print(f"   1 MiB buffer, hashed over and over: {len(mib) / t / 1e9:.2f} GB/s")
    t = per_call(lambda: hashlib.sha256(out_bytes), 10)
    print(f"   {out_bytes.nbytes / 1e6:.0f} MB tensor: {out_bytes.nbytes / t / 1e9:.2f} GB/s")
    for k in (18, 19):
        after = per_call(lambda: (merge_tensor(1 << k), hashlib.sha256(out_bytes)), 10)
        during = per_call(lambda: merge_tensor(1 << k, hashlib.sha256()), 10)
        print(f"   chunks of 2^{k}: merge then hash {after * 1e3:.1f} ms, each chunk hashed as written {during * 1e3:.1f} ms")

    print("4. sha256 of each chunk as it is written, 2^19-element chunks, 10 tensors")
    chunk_rows = (1 << 19) // cols
    n_tensors = 10

    def same_thread() -> tuple[float, float]:
        h, busy = hashlib.sha256(), 0.0
        t0 = time.perf_counter()
        for _ in range(n_tensors):
            for s in range(0, R0, chunk_rows):
                run_kernel(base[s:s + chunk_rows], c[:min(chunk_rows, R0 - s)], out[s:s + chunk_rows])
                t = time.perf_counter()
                h.update(out[s:s + chunk_rows].reshape(-1).view(torch.uint8).numpy())
                busy += time.perf_counter() - t
        return time.perf_counter() - t0, busy

    def second_thread() -> tuple[float, float]:
        q: queue.Queue = queue.Queue(maxsize=4)
        busy = [0.0]

        def hasher():
            h = hashlib.sha256()
            while (item := q.get()) is not None:
                t = time.perf_counter()
                h.update(item)
                busy[0] += time.perf_counter() - t
        th = threading.Thread(target=hasher)
        t0 = time.perf_counter()
        th.start()
        outs = [torch.empty(R0, cols, dtype=torch.bfloat16) for _ in range(2)]  # the pool's two buffers
        for i in range(n_tensors):
            o = outs[i % 2]
            for s in range(0, R0, chunk_rows):
                run_kernel(base[s:s + chunk_rows], c[:min(chunk_rows, R0 - s)], o[s:s + chunk_rows])
                q.put(o[s:s + chunk_rows].reshape(-1).view(torch.uint8).numpy())
        q.put(None)
        th.join()
        return time.perf_counter() - t0, busy[0]

    nbytes = out_bytes.nbytes * n_tensors
    for name, fn in (("same thread", same_thread), ("second thread", second_thread)):
        fn()
        wall, busy = fn()
        print(f"   {name:13s}: {wall * 1e3:.0f} ms, hashing {busy * 1e3:.0f} ms = {nbytes / busy / 1e9:.2f} GB/s")

    print(f"5. a {R0} x {cols} tensor, rank 16, 2^19-element chunks: GEMM + kernel against merge_lora_bf16")
    lora = native.merge_lora_bf16()
    Ln, Rn = Lw.numpy(), R.contiguous().numpy()
    row = np.empty(4 * cols, dtype=np.float32)
    b16, fused_out = base.view(torch.int16).numpy(), torch.empty_like(out)
    o16 = fused_out.view(torch.int16).numpy()

    def merge_fused():
        for s in range(0, R0, chunk_rows):
            n = min(chunk_rows, R0 - s)
            lora(b16[s:].ctypes.data, Ln[s:].ctypes.data, Rn.ctypes.data, 16, n, cols, row.ctypes.data,
                 o16[s:].ctypes.data, sums.ctypes.data, same.ctypes.data)
    per = PER / (R0 * cols)
    gemm_ms = per_call(lambda: merge_tensor(1 << 19), 20) * 1e3
    print(f"   GEMM + kernel {gemm_ms:.1f} ms ({gemm_ms * per / 1e3:.2f} s per 1.1 G)")
    level = ctypes.c_int.in_dll(native.library(), "merge_lora_isa")
    for isa, name in ((2, "AVX-512"), (1, "AVX2 + FMA"), (0, "portable C")):  # capped; the CPU may have less
        level.value = isa
        fused_ms = per_call(merge_fused, 20 if isa else 2) * 1e3
        identical = torch.equal(out.view(torch.int16), fused_out.view(torch.int16))
        print(f"   merge_lora_bf16, {name:10s} {fused_ms:6.1f} ms ({fused_ms * per / 1e3:.2f} s per 1.1 G), "
              f"bit-identical: {identical}")
    level.value = 2


if __name__ == "__main__":
    main()
