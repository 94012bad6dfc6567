"""Native kernels for the merge's hot loop, built on first use with the system's C compiler.

The build is cached under $XDG_CACHE_HOME/switchyard/native/ (keyed by the source and flags), so
only the first merge on a machine pays for it (~0.3 s). Without a compiler, or with
SWITCHYARD_NATIVE=0, `merge_bf16()` returns None and the merge runs its torch path: same output
bits, about half the speed of the fused loop on CPU (docs/benchmarks.md, Merge).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Callable, Optional

SOURCE = Path(__file__).with_name("merge_bf16.c")
FLAGS = ("-O3", "-fopenmp-simd", "-fPIC", "-shared")
LIBS = ("-lm",)  # fmaf where the CPU has no FMA instruction
# target_clones needs the loader's ifunc support (glibc); elsewhere build for the baseline ISA
FALLBACK_FLAGS = FLAGS + ("-DSWITCHYARD_NO_CLONES",)

_lock = threading.Lock()
_loaded: dict[str, object] = {}  # the library under "", then each function by name
last_error: Optional[str] = None  # why the kernel is unavailable, for the curious (and the tests)


def enabled() -> bool:
    return os.environ.get("SWITCHYARD_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "switchyard" / "native"


_P, _I = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = {
    "merge_bf16": [_P, _P, _P, _I, _P, _P],
    "merge_lora_bf16": [_P, _P, _P, _I, _I, _I, _P, _P, _P, _P],
    "hash_in_turn": [_P, _I, _P, _I, _P, _P],
    "merge_lora_bf16_in_turn": [_P, _P, _P, _I, _I, _I, _P, _P, _P, _P, _P, _I, _P, _P],
    "merge_lora_vectorised": [],
}
_RETURNS = {"hash_in_turn": ctypes.c_int, "merge_lora_bf16_in_turn": ctypes.c_int, "merge_lora_vectorised": ctypes.c_int}


def merge_bf16() -> Optional[Callable]:
    """`fn(base_ptr, delta_ptr, out_ptr, n, sums_ptr, same_ptr)` (see merge_bf16.c), or None."""
    return _function("merge_bf16")


def merge_lora_bf16() -> Optional[Callable]:
    """`fn(base_ptr, L_ptr, R_ptr, rank, rows, cols, scratch_ptr, out_ptr, sums_ptr, same_ptr)`: merge_bf16
    with the delta L @ R built in cache from its factors (see merge_bf16.c), or None. Where the CPU has
    no AVX-512 or AVX2 + FMA, the same contract by numpy's GEMM and merge_bf16 (the C loop's portable
    fallback is ~7x slower than the GEMM: benchmarks/merge_kernel.py, item 5)."""
    fn, vectorised = _function("merge_lora_bf16"), _function("merge_lora_vectorised")
    if fn is None or vectorised is None or vectorised():
        return fn
    gemm = _function("merge_bf16")
    with _lock:  # one wrapper per process: its delta buffers are reused across tensors
        return _loaded.setdefault("merge_lora_bf16 by GEMM", _gemm_then_pass(gemm))  # type: ignore[return-value]


def _gemm_then_pass(merge_bf16: Callable) -> Callable:
    local = threading.local()  # a delta buffer per merge worker, reused across chunks

    def fn(base, L, R, rank, rows, cols, scratch, out, sums, same):
        import numpy as np

        n = rows * cols
        buf = getattr(local, "buf", None)
        if buf is None or buf.size < n:
            buf = local.buf = np.empty(max(n, 1), dtype=np.float32)
        left = np.ctypeslib.as_array((ctypes.c_float * (rows * rank)).from_address(L)).reshape(rows, rank)
        right = np.ctypeslib.as_array((ctypes.c_float * (rank * cols)).from_address(R)).reshape(rank, cols)
        delta = buf[:n].reshape(rows, cols)
        np.matmul(left, right, out=delta)
        merge_bf16(base, delta.ctypes.data, out, n, sums, same)
    return fn


def hash_in_turn() -> Optional[Callable]:
    """`fn(data_ptr, n, turn_ptr, k, update_fn_ptr, ctx_ptr) -> int`: hash in file order across threads
    (see merge_bf16.c; merger/ordered.py), or None."""
    return _function("hash_in_turn")


def merge_lora_bf16_in_turn() -> Optional[Callable]:
    """`fn(<merge_lora_bf16's arguments>, turn_ptr, k, update_fn_ptr, ctx_ptr) -> int`: merge_lora_bf16,
    then hash_in_turn of its output, or both at once, row group by row group, when the turn is already
    the caller's (see merge_bf16.c; merger/ordered.py). None where merge_lora_bf16 has no vector
    routine (its GEMM stand-in then runs, hashed after) or there is no library."""
    fn, vectorised = _function("merge_lora_bf16_in_turn"), _function("merge_lora_vectorised")
    return fn if fn is not None and vectorised is not None and vectorised() else None


def library() -> Optional[ctypes.CDLL]:
    """The built library itself (tests set its `merge_lora_isa`), or None."""
    return _loaded[""] if merge_bf16() is not None else None  # type: ignore[return-value]


def _function(name: str) -> Optional[Callable]:
    if not enabled():
        return None
    with _lock:
        if name not in _loaded:
            if "" not in _loaded:
                _loaded[""] = _load()
            lib = _loaded[""]
            fn = None
            if lib is not None:
                fn = getattr(lib, name)
                fn.argtypes = _SIGNATURES[name]
                fn.restype = _RETURNS.get(name)
            _loaded[name] = fn  # ctypes drops the GIL for the call: both merge workers run it at once
        return _loaded[name]


def _load() -> Optional[ctypes.CDLL]:
    global last_error
    try:
        return ctypes.CDLL(str(_build()))
    except (OSError, subprocess.SubprocessError, RuntimeError) as e:
        last_error = str(e)
        return None


def _build() -> Path:
    src = SOURCE.read_bytes()
    cc = os.environ.get("CC", "cc")
    key = hashlib.sha256(src + repr((cc, FLAGS, LIBS, platform.machine())).encode()).hexdigest()[:16]
    out = cache_dir() / f"merge_bf16-{key}.so"
    if out.exists():
        return out
    if shutil.which(cc) is None:
        raise RuntimeError(f"no C compiler ({cc!r} not found; install gcc or set CC)")
    out.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for flags in (FLAGS, FALLBACK_FLAGS):
        # built beside its final name and renamed: concurrent merges never load a half-written file
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".build-", suffix=".so")
        os.close(fd)
        try:
            proc = subprocess.run([cc, *flags, "-o", tmp, str(SOURCE), *LIBS], capture_output=True, text=True, timeout=120)
            if proc.returncode == 0:
                os.replace(tmp, out)
                return out
            errors.append((proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1])
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError(f"{cc} could not build {SOURCE.name}: {errors}")
