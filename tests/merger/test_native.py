"""The fused C kernel (merger/native): torch's rounding bit for bit, the statistics, its build cache,
and the torch path when it cannot be built."""

from __future__ import annotations

import ctypes
import subprocess

import numpy as np
import pytest
import torch

from merger import native
from merger.core import apply
from merger.core.fast import chunk_rows
from merger.core.lora import LoraModule
from merger.core.plan import AddLora, TensorTask
from merger.errors import NonFiniteError


def _call(fn, base: torch.Tensor, delta: torch.Tensor):
    out = torch.empty_like(base)
    sums, same = np.zeros(2), np.zeros(1, dtype=np.int64)
    fn(base.data_ptr(), delta.data_ptr(), out.data_ptr(), base.numel(), sums.ctypes.data, same.ctypes.data)
    return out, float(sums[0]), float(sums[1]), int(same[0])


def _bf16(bits: list[int]) -> torch.Tensor:
    return torch.tensor(bits, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)


def test_kernel_rounds_like_torch_and_measures(kernel):
    g = torch.Generator().manual_seed(3)
    n = 3001  # not a multiple of the block (1024) or of any vector width
    base = (torch.randn(n, generator=g) * 0.05).to(torch.bfloat16)
    delta = torch.randn(n, generator=g) * 1e-3
    delta[::5] = 0.0  # these outputs equal the base
    # exact ties: x halfway between two bfloat16 values, lower neighbour even and odd (nearest-even
    # goes down, then up); -0.0 + 0.0 (+0.0: not the base's bits); subnormals, a tie and not
    base[:5] = _bf16([0x3F80, 0x3F81, 0x8000, 0x0001, 0x0001])
    delta[:5] = torch.tensor([2.0 ** -8, 2.0 ** -8, 0.0, 2.0 ** -134, 2.0 ** -136])
    out, w2, err2, same = _call(kernel, base, delta)
    x = base.float() + delta
    want = x.to(torch.bfloat16)
    assert torch.equal(out.view(torch.int16), want.view(torch.int16))
    assert out[:5].view(torch.int16).tolist() == [0x3F80, 0x3F82, 0x0000, 0x0002, 0x0001]
    assert same == int((want.view(torch.int16) == base.view(torch.int16)).sum())
    assert same >= n // 5 - 1
    x64 = x.double()
    assert w2 == pytest.approx(float((x64 ** 2).sum()), rel=1e-5)
    assert err2 == pytest.approx(float(((want.double() - x64) ** 2).sum()), rel=1e-5)


def test_kernel_overflow_rounds_to_inf_like_torch_and_says_so_in_the_sums(kernel):
    base = _bf16([0x7F7F, 0x3F80])  # the largest finite bfloat16, 1.0
    delta = torch.tensor([2.0 ** 120, 0.0])  # finite in float32, beyond bfloat16's range once rounded
    out, w2, _, _ = _call(kernel, base, delta)
    assert torch.equal(out.view(torch.int16), (base.float() + delta).to(torch.bfloat16).view(torch.int16))
    assert out[0].view(torch.int16).item() == 0x7F80  # +Inf
    assert not np.isfinite(w2)  # the caller's cue for its exact check


@pytest.mark.parametrize("isa", [2, 1, 0])  # AVX-512, AVX2 + FMA, portable C (where the CPU has them)
@pytest.mark.parametrize("rows,cols,rank", [(8, 256, 16), (7, 200, 16), (13, 777, 7), (5, 64, 1), (4, 130, 64),
                                           (1, 5, 3)])
def test_lora_kernel_equals_the_gemm_then_the_kernel(monkeypatch, kernel, lora_kernel, rows, cols, rank, isa):
    """merge_lora_bf16 builds the delta itself (FMAs over r in order, four rows at a time, 64 or 16
    columns at a time with AVX-512 or AVX2): the same bits as numpy's GEMM followed by merge_bf16, for
    row counts that are not multiples of four and widths with a tail, and the same sums."""
    level = ctypes.c_int.in_dll(native.library(), "merge_lora_isa")
    monkeypatch.setattr(level, "value", isa)
    g = np.random.default_rng(rows * cols + rank)
    L = g.standard_normal((rows, rank), dtype=np.float32) * 0.05
    R = g.standard_normal((rank, cols), dtype=np.float32) * 0.02
    base = (torch.randn(rows, cols, generator=torch.Generator().manual_seed(rank)) * 0.05).to(torch.bfloat16)
    base[0, :3] = 0.0  # zeros in the base: outputs are the delta's rounding alone
    d = torch.from_numpy(L @ R)
    want, w2, err2, same = _call(kernel, base, d)
    out = torch.empty_like(base)
    sums, eq = np.zeros(2), np.zeros(1, dtype=np.int64)
    scratch = np.full(4 * cols, np.nan, dtype=np.float32)  # stale scratch must not leak in
    lora_kernel(base.data_ptr(), L.ctypes.data, R.ctypes.data, rank, rows, cols, scratch.ctypes.data,
                out.data_ptr(), sums.ctypes.data, eq.ctypes.data)
    assert torch.equal(out.view(torch.int16), want.view(torch.int16))
    assert int(eq[0]) == same
    assert sums[0] == pytest.approx(w2, rel=1e-6) and sums[1] == pytest.approx(err2, rel=1e-6)


def test_without_vector_fmas_the_delta_comes_from_the_gemm(monkeypatch, kernel, lora_kernel):
    """Where merge_lora_bf16 would run its portable loop (~7x slower than a GEMM), merge_lora_bf16()
    hands out numpy's GEMM + merge_bf16 under the same contract: the same bits and sums."""
    real = native._function
    monkeypatch.setattr(native, "_function", lambda name: (lambda: 0) if name == "merge_lora_vectorised" else real(name))
    slow = native.merge_lora_bf16()
    assert slow is not lora_kernel
    assert native.merge_lora_bf16() is slow  # one wrapper, its buffers reused across tensors
    g = np.random.default_rng(5)
    rows, cols, rank = 13, 777, 7
    L = g.standard_normal((rows, rank), dtype=np.float32) * 0.05
    R = g.standard_normal((rank, cols), dtype=np.float32) * 0.02
    base = (torch.randn(rows, cols, generator=torch.Generator().manual_seed(5)) * 0.05).to(torch.bfloat16)
    results = []
    scratch = np.empty(4 * cols, np.float32)
    for fn in (lora_kernel, slow):
        out = torch.empty_like(base)
        sums, eq = np.zeros(2), np.zeros(1, dtype=np.int64)
        fn(base.data_ptr(), L.ctypes.data, R.ctypes.data, rank, rows, cols, scratch.ctypes.data,
           out.data_ptr(), sums.ctypes.data, eq.ctypes.data)
        results.append((out.view(torch.int16), sums, int(eq[0])))
    (a, sa, ea), (b, sb, eb) = results
    assert torch.equal(a, b) and ea == eb
    assert sa == pytest.approx(sb, rel=1e-6)


def _task(shape, fif=False, nan=False):
    g = torch.Generator().manual_seed(0)
    out_f, in_f = (shape[1], shape[0]) if fif else shape
    A = torch.randn(4, in_f, generator=g)
    if nan:
        A[2, 3] = float("nan")
    B = torch.randn(out_f, 4, generator=g) * 0.05
    B[3] = 0
    mod = LoraModule("m", "linear", A, B, scaling=0.5, fan_in_fan_out=fif)
    base = torch.randn(shape, generator=g).to(torch.bfloat16)
    return TensorTask("m.weight", "m.weight", "BF16", "BF16", shape, (AddLora(mod, "a"),)), base


@pytest.mark.parametrize("fif", [False, True])
@pytest.mark.parametrize("chunk", [1 << 19, 7 * 40])  # one chunk; seven rows a chunk, the last one short
def test_plain_lora_with_the_kernel_matches_the_torch_loop(monkeypatch, kernel, fif, chunk):
    monkeypatch.setattr(apply, "CHUNK_ELEMENTS", chunk)
    monkeypatch.setattr(apply._scratch, "bufs", {}, raising=False)
    calls = []
    lora = native.merge_lora_bf16()
    monkeypatch.setattr(native, "merge_lora_bf16", lambda: lambda *a: calls.append(a[4] * a[5]) or lora(*a))
    task, base = _task((48, 40) if not fif else (40, 48), fif)
    fast_out, fast = apply.run_task(task, base)
    rows = chunk_rows(base.shape, chunk)
    assert chunk > 280 or rows == 4  # 7 and 5 rows a chunk, rounded down to the kernel's 4
    assert sum(calls) == base.numel() and len(calls) == -(-base.shape[0] // rows)  # 1, 12 or 10 chunks
    monkeypatch.setenv("SWITCHYARD_NATIVE", "0")
    monkeypatch.setattr(native, "merge_lora_bf16", lambda: None)
    torch_out, slow = apply.run_task(task, base)
    assert torch.equal(fast_out.view(torch.int16), torch_out.view(torch.int16))
    assert (fast.delta_nonzero, fast.vanished) == (slow.delta_nonzero, slow.vanished)
    assert fast.rel_error == pytest.approx(slow.rel_error, rel=1e-5)
    assert fast.delta_rel_error == pytest.approx(slow.delta_rel_error, rel=1e-5)


def test_nan_in_the_adapter_is_refused_on_the_kernel_path(kernel):
    task, base = _task((48, 40), nan=True)
    with pytest.raises(NonFiniteError, match="m.weight has NaN/Inf"):
        apply.run_task(task, base)


def test_the_build_is_cached_and_reused(tmp_path, monkeypatch, kernel):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    runs = []
    real = subprocess.run
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: runs.append(a) or real(*a, **k))
    for _ in range(2):
        monkeypatch.setattr(native, "_loaded", {})  # as a fresh process would
        assert native.merge_bf16() is not None
    assert len(runs) == 1  # compiled once, then loaded from the cache
    built = list((tmp_path / "switchyard" / "native").iterdir())
    assert [p.suffix for p in built] == [".so"]  # no half-built leftovers


def test_without_a_compiler_the_torch_path_merges(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setattr(native, "_loaded", {})
    assert native.merge_bf16() is None
    assert "no C compiler" in native.last_error and "no-such-cc" in native.last_error
    task, base = _task((48, 40))
    out, st = apply.run_task(task, base)
    want = (base.float() + task.steps[0].module.B * 0.5 @ task.steps[0].module.A).to(torch.bfloat16)
    assert torch.allclose(out.float(), want.float(), rtol=0, atol=1e-2) and st.delta_nonzero == 47 * 40


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("SWITCHYARD_NATIVE", "0")
    assert native.merge_bf16() is None


def test_an_unwritable_cache_means_the_torch_path(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # switchyard/native/ cannot be made under a file
    monkeypatch.setattr(native, "_loaded", {})
    assert native.merge_bf16() is None
    assert native.last_error
    task, base = _task((48, 40))
    out, st = apply.run_task(task, base)
    assert out.shape == base.shape and st.delta_nonzero == 47 * 40


def test_a_merge_says_when_it_could_not_use_the_kernel(tmp_path, monkeypatch, kernel):
    from merger.api import merge
    from tests.merger.common import make_adapter, tiny_model

    base = tiny_model(tmp_path / "base", dtype=torch.bfloat16)
    adapter = make_adapter(base, tmp_path / "adapter", r=4, target_modules=["q_proj"])
    monkeypatch.setattr(native, "_loaded", {})
    ok = merge(base, [adapter], tmp_path / "ok")
    assert ok.provenance["resources"]["native_kernel"] == "used"
    assert not [n for n in ok.notes if "C kernel" in n]

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("CC", "no-such-cc")
    monkeypatch.setattr(native, "_loaded", {})
    slow = merge(base, [adapter], tmp_path / "slow")
    assert slow.provenance["resources"]["native_kernel"].startswith("unavailable: no C compiler")
    assert [n for n in slow.notes if "C kernel could not be built" in n and "install a C compiler" in n]
    assert slow.provenance["output"]["shards_sha256"] == ok.provenance["output"]["shards_sha256"]  # same bytes

    f32 = merge(tiny_model(tmp_path / "f32"), [adapter], tmp_path / "f32-out")
    assert f32.provenance["resources"]["native_kernel"].startswith("not used")
    assert not [n for n in f32.notes if "C kernel" in n]
