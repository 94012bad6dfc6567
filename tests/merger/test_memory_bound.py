"""Peak memory is independent of the model's size: under 2 x the largest tensor + the adapter + the
interpreter's baseline (measured in fresh processes, so the page cache and this test's own memory do
not count)."""

from __future__ import annotations

import json
from pathlib import Path
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from tests.merger.common import make_adapter, tiny_model

SCRIPT = """
import json, sys
from pathlib import Path
import torch, merger.api, merger.executor, merger.core.apply, safetensors.torch
from merger.provenance import peak_rss_bytes
if sys.argv[1] == "merge":
    merger.api.merge(Path(sys.argv[2]), [Path(sys.argv[3])], Path(sys.argv[4]))
print(json.dumps(peak_rss_bytes()))
"""


def _peak(*args) -> int:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _build(small: Path, base: Path, layers: int, extras: int, dtype) -> tuple[int, int]:
    """The tiny Llama's layers repeated `layers` times plus `extras` untouched 4 MiB tensors, in 100 MiB
    shards -> (total bytes, largest tensor's bytes)."""
    from safetensors.torch import load_file

    base.mkdir()
    (base / "config.json").write_text((small / "config.json").read_text())
    g = torch.Generator().manual_seed(0)
    ref = load_file(small / "model.safetensors")
    tensors, weight_map, shard, shard_i = {}, {}, {}, 0
    for i in range(layers):
        for k, v in ref.items():
            if ".layers.0." in k:
                name = k.replace(".layers.0.", f".layers.{i}.")
                tensors[name] = torch.randn((v.shape[0],) if v.dim() == 1 else v.shape, generator=g).to(dtype)
    # pad the checkpoint with large untouched tensors (passthrough) to make the model big
    for j in range(extras):
        tensors[f"extra.{j}.weight"] = torch.randn(1024, 1024 * 4 // dtype.itemsize, generator=g).to(dtype)  # 4 MiB
    for k, v in ref.items():
        if ".layers." not in k:
            tensors[k] = v.to(dtype)
    for n in sorted(tensors):
        shard[n] = tensors[n]
        if sum(t.numel() * t.element_size() for t in shard.values()) > 100 << 20:
            fname = f"model-{shard_i:05d}.safetensors"
            save_file(shard, base / fname, metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
            shard, shard_i = {}, shard_i + 1
    if shard:
        fname = f"model-{shard_i:05d}.safetensors"
        save_file(shard, base / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    sizes = [t.numel() * t.element_size() for t in tensors.values()]
    return sum(sizes), max(sizes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # the torch path; the torch-free ordered pass
def test_peak_memory_bound_on_a_model_much_larger_than_the_bound(tmp_path, dtype):
    """Against a merge of a 4x smaller model of the same make (the interpreter, the merge's own buffers:
    what does not grow with the model), a ~400 MiB model's merge needs at most 2 x its largest tensor
    + the adapter more."""
    small = tiny_model(tmp_path / "small", "llama")
    adapter = make_adapter(small, tmp_path / "adapter", r=4, target_modules=["q_proj", "v_proj"])
    _build(small, tmp_path / "few", layers=6, extras=24, dtype=dtype)  # big enough to fill every queue
    total, largest = _build(small, tmp_path / "base", layers=24, extras=96, dtype=dtype)
    baseline = _peak("merge", str(tmp_path / "few"), str(adapter), str(tmp_path / "few-out"))
    peak = _peak("merge", str(tmp_path / "base"), str(adapter), str(tmp_path / "out"))
    prov = json.loads((tmp_path / "out" / "switchyard.json").read_text())
    assert prov["resources"]["torch"].startswith("not used" if dtype == torch.bfloat16 else "used")
    adapter_bytes = (adapter / "adapter_model.safetensors").stat().st_size
    bound = 2 * largest + adapter_bytes
    assert total > 4 * bound  # the model is much larger than the bound, so holding it would fail
    assert peak - baseline < bound, (peak - baseline, bound)


def test_peak_is_the_process_own_not_its_parent():
    """ru_maxrss keeps the parent's peak across fork + exec on Linux: a child of a 300 MB process
    reported 300 MB. peak_rss_bytes is the child's own high-water mark."""
    import numpy as np

    from merger.provenance import peak_rss_bytes

    ballast = np.ones(300 << 20, dtype=np.uint8)  # this process: 300 MB more resident
    code = "from merger.provenance import peak_rss_bytes; print(peak_rss_bytes())"
    child = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout)
    assert peak_rss_bytes() > ballast.nbytes > 4 * child > 0
