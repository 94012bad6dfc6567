"""The torch-free common path (merger/core/fast.py): the same bytes as the torch path, taken only where
it applies, and a process that takes it never imports torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from merger.api import MergeOptions, merge
from merger.core import apply, fast
from merger.core.lora import LoraModule
from merger.core.plan import AddLora, TensorTask
from merger.errors import NonFiniteError
from tests.merger.common import make_adapter, tiny_model

ROOT = Path(__file__).resolve().parents[2]


def _bf16_factors(adapter: Path) -> Path:
    """The adapter with its factors stored in bfloat16 (what many trainers save)."""
    from safetensors.torch import load_file, save_file

    f = adapter / "adapter_model.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(f).items()}, f)
    return adapter


def _lora_only(adapter: Path) -> Path:
    """Without the full embedding PEFT saves beside an embedding LoRA (save_embedding_layers=False)."""
    from safetensors.torch import load_file, save_file

    f = adapter / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(f).items() if "lora_" in k}, f)
    return adapter


CASES = {
    # name: (architecture, LoRA kwargs); scalings that are not powers of two, so the order of
    # scaling and product matters to the last bit
    "all-linear": ("llama", dict(r=8, lora_alpha=12, target_modules="all-linear")),
    "rslora": ("llama", dict(r=4, lora_alpha=7, use_rslora=True, target_modules=["q_proj", "down_proj"])),
    "embedding": ("llama", dict(r=4, lora_alpha=6, target_modules=["embed_tokens", "v_proj"])),
    "conv1d": ("gpt2", dict(r=4, lora_alpha=5, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
    "bf16-factors": ("llama", dict(r=8, lora_alpha=12, target_modules=["q_proj", "up_proj"])),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_bytes_and_statistics_as_the_torch_path(tmp_path, monkeypatch, kernel, case):
    arch, lora = CASES[case]
    base = tiny_model(tmp_path / "base", arch=arch, dtype=torch.bfloat16)
    adapter = make_adapter(base, tmp_path / "adapter", **lora)
    if case == "bf16-factors":
        _bf16_factors(adapter)
    if case == "embedding":
        _lora_only(adapter)
    free = merge(base, [adapter], tmp_path / "free")
    monkeypatch.setenv("SWITCHYARD_TORCH_FREE", "0")
    slow = merge(base, [adapter], tmp_path / "torch")
    assert free.provenance["resources"]["torch"].startswith("not used")
    assert slow.provenance["resources"]["torch"] == "used"
    assert free.provenance["output"]["shards_sha256"] == slow.provenance["output"]["shards_sha256"]
    a, b = free.rounding, slow.rounding
    assert (a["tensors_merged"], a["delta_entries"], a["vanished_entries"]) == \
        (b["tensors_merged"], b["delta_entries"], b["vanished_entries"])
    assert a["worst_rel_error"] == pytest.approx(b["worst_rel_error"], rel=1e-5)
    assert a["worst_delta_rel_error"] == pytest.approx(b["worst_delta_rel_error"], rel=1e-4)


def test_a_torch_free_merge_never_imports_torch(tmp_path, kernel):
    base = tiny_model(tmp_path / "base", dtype=torch.bfloat16)
    adapter = make_adapter(base, tmp_path / "adapter", r=4, target_modules=["q_proj"])
    code = ("import sys; from pathlib import Path; from merger.api import merge; "
            f"r = merge(Path({str(base)!r}), [Path({str(adapter)!r})], Path({str(tmp_path / 'out')!r})); "
            "print(r.provenance['resources']['torch']); print('torch' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr
    assert run.stdout.split("\n")[:2] == ["not used (torch-free path, merger/core/fast.py)", "False"]


def test_plans_it_cannot_do_take_the_torch_path(tmp_path, monkeypatch, kernel):
    bf16 = tiny_model(tmp_path / "bf16", dtype=torch.bfloat16)
    plain = make_adapter(bf16, tmp_path / "plain", r=4, target_modules=["q_proj"])
    dora = make_adapter(bf16, tmp_path / "dora", r=4, target_modules=["q_proj"], use_dora=True)
    saved = make_adapter(bf16, tmp_path / "saved", r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    f32 = tiny_model(tmp_path / "f32")

    def path(base, adapters, **options):
        out = tmp_path / f"out-{len(list(tmp_path.iterdir()))}"
        return merge(base, adapters, out, MergeOptions(**options)).provenance["resources"]["torch"]

    assert path(bf16, [plain]).startswith("not used")
    assert path(bf16, [dora]) == "used"  # DoRA's norms
    assert path(bf16, [saved]) == "used"  # a replaced tensor
    assert path(f32, [plain]) == "used"  # not bfloat16
    assert path(bf16, [plain], dtype="float16") == "used"  # converted on the way
    assert path(bf16, [plain], precise=True) == "used"
    assert path(bf16, [plain, plain]) == "used"
    monkeypatch.setenv("SWITCHYARD_NATIVE", "0")
    assert path(bf16, [plain]) == "used"  # no kernel, no torch-free path


def _task(shape, fif=False, kind="linear"):
    g = np.random.default_rng(0)
    out_f, in_f = (shape[1], shape[0]) if (fif or kind == "embedding") else shape
    A = g.standard_normal((4, in_f), dtype=np.float32)
    B = g.standard_normal((out_f, 4), dtype=np.float32) * 0.05
    B[3] = 0
    mod = LoraModule("m", kind, A, B, scaling=0.7, fan_in_fan_out=fif)
    base = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    return TensorTask("m.weight", "m.weight", "BF16", "BF16", shape, (AddLora(mod, "a"),)), base


@pytest.mark.parametrize("chunk", [1 << 19, 7 * 40])  # one chunk; seven rows a chunk, the last one short
@pytest.mark.parametrize("kind", ["linear", "conv1d", "embedding"])
def test_plain_lora_equals_the_torch_kernel_loop(monkeypatch, lora_kernel, chunk, kind):
    monkeypatch.setattr(fast, "CHUNK_ELEMENTS", chunk)
    task, base = _task((48, 40), fif=kind == "conv1d", kind="embedding" if kind == "embedding" else "linear")
    out = np.empty(base.shape, dtype=np.uint16)
    st = fast.plain_lora(task, base.view(torch.int16).numpy().view(np.uint16), out, lora_kernel)
    mod = task.steps[0].module
    torch_task = TensorTask(task.name, task.source, "BF16", "BF16", task.shape, (AddLora(LoraModule(
        "m", mod.kind, torch.from_numpy(mod.A), torch.from_numpy(mod.B), mod.scaling, mod.fan_in_fan_out), "a"),))
    want, ref = apply.run_task(torch_task, base)
    assert np.array_equal(out, want.view(torch.int16).numpy().view(np.uint16))
    assert (st.numel, st.delta_nonzero, st.vanished) == (ref.numel, ref.delta_nonzero, ref.vanished)
    assert st.rel_error == pytest.approx(ref.rel_error, rel=1e-5)
    assert st.delta_rel_error == pytest.approx(ref.delta_rel_error, rel=1e-4)


def test_bf16_factors_are_read_exactly():
    bits = np.array([0x3F80, 0xBFC0, 0x0001, 0x7F7F], dtype=np.uint16)  # 1, -1.5, a subnormal, the largest
    want = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float().numpy()
    assert np.array_equal(fast.to_float32(bits.view(fast.BF16).reshape(2, 2)), want.reshape(2, 2))


def test_nan_in_a_merged_tensor_is_refused(lora_kernel):
    task, base = _task((48, 40))
    task.steps[0].module.A[2, 3] = np.nan
    with pytest.raises(NonFiniteError, match="m.weight has NaN/Inf"):
        fast.plain_lora(task, base.view(torch.int16).numpy().view(np.uint16), np.empty((48, 40), np.uint16), lora_kernel)


def test_nan_in_the_adapter_file_is_refused_before_anything_is_written(tmp_path, kernel):
    from safetensors.torch import load_file, save_file

    base = tiny_model(tmp_path / "base", dtype=torch.bfloat16)
    adapter = make_adapter(base, tmp_path / "adapter", r=4, target_modules=["q_proj"])
    f = adapter / "adapter_model.safetensors"
    t = load_file(f)
    key = sorted(t)[0]
    t[key][0, 0] = float("inf")
    save_file(t, f)
    with pytest.raises(NonFiniteError, match=f"tensor {key} has NaN/Inf"):
        merge(base, [adapter], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4  # the adapter untouched
