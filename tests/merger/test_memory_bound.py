"""Peak memory is independent of the model's size: under 2 x the largest tensor + the adapter + the
interpreter's baseline (measured in fresh processes, so the page cache and this test's own memory do
not count)."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from safetensors.torch import save_file

from tests.merger.common import make_adapter, tiny_model

SCRIPT = """
import json, resource, sys
from pathlib import Path
import torch, merger.api, merger.executor, merger.core.apply, safetensors.torch
if sys.argv[1] == "merge":
    merger.api.merge(Path(sys.argv[2]), [Path(sys.argv[3])], Path(sys.argv[4]))
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))
"""


def _peak(*args) -> int:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_peak_memory_bound_on_a_model_much_larger_than_the_bound(tmp_path):
    # the tiny Llama's layers repeated 24 times plus 96 untouched 4 MiB tensors: ~400 MiB in 100 MiB shards
    small = tiny_model(tmp_path / "small", "llama")
    adapter = make_adapter(small, tmp_path / "adapter", r=4, target_modules=["q_proj", "v_proj"])
    base = tmp_path / "base"
    base.mkdir()
    cfg = json.loads((small / "config.json").read_text())
    (base / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(0)
    from safetensors.torch import load_file

    ref = load_file(small / "model.safetensors")
    tensors, weight_map, shard, shard_i = {}, {}, {}, 0
    for i in range(24):
        for k, v in ref.items():
            if ".layers.0." in k:
                name = k.replace(".layers.0.", f".layers.{i}.")
                tensors[name] = torch.randn((v.shape[0],) if v.dim() == 1 else v.shape, generator=g)
    # pad the checkpoint with large untouched tensors (passthrough) to make the model big
    for j in range(96):
        tensors[f"extra.{j}.weight"] = torch.randn(1024, 1024, generator=g)  # 4 MiB each
    for k, v in ref.items():
        if ".layers." not in k:
            tensors[k] = v
    names = sorted(tensors)
    for n in names:
        shard[n] = tensors[n]
        if sum(t.numel() * 4 for t in shard.values()) > 100 << 20:
            fname = f"model-{shard_i:05d}.safetensors"
            save_file(shard, base / fname, metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
            shard, shard_i = {}, shard_i + 1
    if shard:
        fname = f"model-{shard_i:05d}.safetensors"
        save_file(shard, base / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    total = sum(t.numel() * 4 for t in tensors.values())
    largest = max(t.numel() * 4 for t in tensors.values())
    del tensors, shard, ref

    baseline = _peak("baseline")
    peak = _peak("merge", str(base), str(adapter), str(tmp_path / "out"))
    adapter_bytes = (adapter / "adapter_model.safetensors").stat().st_size
    bound = 2 * largest + adapter_bytes
    assert total > 4 * bound  # the model is much larger than the bound, so holding it would fail
    assert peak - baseline < bound + (16 << 20), (peak - baseline, bound)
