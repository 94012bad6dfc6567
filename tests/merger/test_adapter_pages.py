"""A safetensors adapter is viewed through a private memory map, not copied: its pages are dropped
after the load's check and after each tensor that read them is written."""

from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file

from merger.api import merge
from merger.io.adapter import AdapterPages, load_adapter
from merger.io.checkpoint import read_shard_header
from tests.merger.common import load_output, make_adapter, tiny_model


def _rss_file_kb() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise AssertionError("no RssFile in /proc/self/status")


def test_released_pages_leave_memory_and_come_back_on_read(tmp_path):
    g = torch.Generator().manual_seed(0)
    saved = {f"t{i}": torch.randn(1024, 1024, generator=g) for i in range(8)}  # 32 MiB of float32
    save_file(saved, tmp_path / "a.safetensors")
    pages = AdapterPages(tmp_path / "a.safetensors")
    tensors = pages.tensors(read_shard_header(tmp_path / "a.safetensors"))
    before = _rss_file_kb()
    assert all(bool(torch.equal(tensors[k], v)) for k, v in saved.items())  # reads every page
    touched = _rss_file_kb()
    assert touched - before > 24 * 1024, (before, touched)
    assert pages.release(list(tensors.values())) >= 32 << 20
    assert touched - _rss_file_kb() > 24 * 1024
    assert all(bool(torch.equal(tensors[k], v)) for k, v in saved.items())  # back from the page cache


def test_release_ignores_memory_outside_the_map(tmp_path):
    save_file({"t": torch.ones(4096)}, tmp_path / "a.safetensors")
    pages = AdapterPages(tmp_path / "a.safetensors")
    own = torch.full((1 << 16,), 7.0)  # ordinary memory: dropping its pages would zero it
    assert pages.release([own, None, torch.empty(0)]) == 0
    assert bool((own == 7.0).all())


def test_adapter_tensors_view_the_file_and_the_merge_releases_every_one(tmp_path, monkeypatch):
    base = tiny_model(tmp_path / "base", "llama")
    adapter = make_adapter(base, tmp_path / "adapter", r=4, target_modules="all-linear")
    loaded = load_adapter(adapter)
    assert loaded.pages is not None
    ref = load_file(adapter / "adapter_model.safetensors")
    for mod in loaded.parsed.modules.values():
        for t in (mod.A, mod.B):
            offset = t.data_ptr() - loaded.pages._base
            assert 0 <= offset < loaded.pages.size  # a view into the map, not a copy
    key = next(k for k in ref if k.endswith("lora_B.weight"))
    mod = loaded.parsed.modules[key.removeprefix("base_model.model.").removesuffix(".lora_B.weight")]
    assert torch.equal(mod.B, ref[key])

    released: set[int] = set()  # offsets in the file of the tensors released
    real = AdapterPages.release

    def spy(self, tensors):
        released.update(t.data_ptr() - self._base for t in tensors if t is not None)
        return real(self, tensors)

    monkeypatch.setattr(AdapterPages, "release", spy)
    merge(base, [adapter], tmp_path / "out")
    again = load_adapter(adapter)
    factors = {t.data_ptr() - again.pages._base for m in again.parsed.modules.values() for t in (m.A, m.B)}
    assert factors and factors <= released  # every LoRA factor let go once its base tensor was written
    merged = load_output(tmp_path / "out")
    unmerged = load_file(base / "model.safetensors")
    assert any(not torch.equal(merged[k], unmerged[k]) for k in unmerged if k.endswith("q_proj.weight"))
