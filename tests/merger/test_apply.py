"""The fused single-LoRA fast path agrees with the general step-by-step path, values and statistics."""

from __future__ import annotations

import pytest
import torch

from merger.core import apply
from merger.core.lora import LoraModule
from merger.core.plan import AddLora, TensorTask


@pytest.mark.parametrize("fif, src, out", [(False, "BF16", "BF16"), (True, "BF16", "BF16"), (False, "F32", "BF16"),
                                           (False, "F16", "F32")])
@pytest.mark.parametrize("chunk", [1 << 19, 7 * 40])  # one chunk; seven rows a chunk, the last one short
def test_fast_path_matches_general_path(monkeypatch, fif, src, out, chunk):
    monkeypatch.setattr(apply, "CHUNK_ELEMENTS", chunk)
    monkeypatch.setattr(apply._scratch, "bufs", {}, raising=False)  # chunk buffers sized for this test
    g = torch.Generator().manual_seed(0)
    shape = (48, 40) if not fif else (40, 48)  # storage orientation; the layer is out=48, in=40
    base = torch.randn(shape, generator=g).to(apply.ST_TO_TORCH[src])
    B = torch.randn(48, 4, generator=g) * 0.05
    B[3] = 0  # a zero row: its entries of dW are exactly zero
    mod = LoraModule("m", "linear", torch.randn(4, 40, generator=g), B, scaling=0.5, fan_in_fan_out=fif)
    task = TensorTask("m.weight", "m.weight", src, out, shape, (AddLora(mod, "a"),))
    fast_out, fast = apply.run_task(task, base)
    monkeypatch.setattr(apply, "_is_plain_lora", lambda t: False)
    slow_out, slow = apply.run_task(task, base)
    assert torch.equal(fast_out, slow_out) or torch.allclose(fast_out.float(), slow_out.float(), rtol=0, atol=1e-2)
    assert fast.delta_nonzero == slow.delta_nonzero == 47 * 40
    assert abs(fast.vanished - slow.vanished) <= 0.01 * fast.numel
    assert fast.rel_error == pytest.approx(slow.rel_error, rel=0.05, abs=1e-9)
    assert fast.delta_rel_error == pytest.approx(slow.delta_rel_error, rel=0.05, abs=1e-9)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.int8])
def test_count_equal_is_bitwise_with_or_without_scratch(dtype):
    g = torch.Generator().manual_seed(1)
    a = (torch.randn(1000, generator=g) * 50).to(dtype)
    b = a.clone()
    b[::7] = b[::7] + 1  # 143 entries differ
    if dtype.is_floating_point:
        a[5], b[5] = 0.0, -0.0  # equal as numbers, not as bits: counted as different
    want = int((a.view(torch.uint8).reshape(1000, -1) == b.view(torch.uint8).reshape(1000, -1)).all(dim=1).sum())
    assert want == (1000 - 143 - (1 if dtype.is_floating_point else 0))
    assert apply._count_equal(a, b) == want
    assert apply._count_equal(a, b, scratch=torch.empty(1000, dtype=torch.float32)) == want
    assert apply._count_equal(a, b, scratch=torch.empty(3, dtype=torch.float32)) == want  # too small: ignored


def test_cpu_merge_runs_on_one_intra_op_thread_and_restores_the_setting(tmp_path, monkeypatch):
    """The merge workers are the parallelism; intra-op threads on small chunks only contend with them
    (benchmarked in docs/benchmarks.md, Merge). The caller's setting (validate, the engine) comes back."""
    from merger.api import merge
    from tests.merger.common import make_adapter, tiny_model

    base = tiny_model(tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "adapter", r=4, target_modules=["q_proj", "down_proj"])
    seen = []
    real = apply.run_task

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(apply, "run_task", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        merge(base, [adapter], tmp_path / "out")
        assert seen and set(seen) == {1}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
