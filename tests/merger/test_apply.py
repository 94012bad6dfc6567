"""The fused single-LoRA fast path agrees with the general step-by-step path, values and statistics."""

from __future__ import annotations

import pytest
import torch

from merger.core import apply
from merger.core.lora import LoraModule
from merger.core.plan import AddLora, TensorTask


@pytest.mark.parametrize("fif, src, out", [(False, "BF16", "BF16"), (True, "BF16", "BF16"), (False, "F32", "BF16"),
                                           (False, "F16", "F32")])
def test_fast_path_matches_general_path(monkeypatch, fif, src, out):
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
