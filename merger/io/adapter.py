"""Load a PEFT adapter folder: adapter_config.json + adapter_model.safetensors (a `.bin` pickle only
with allow_pickle, through `torch.load(weights_only=True)`). Adapters are small, so they are held
whole in memory (they count in the merge's memory bound as "+ the adapter").
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from merger.core.adapter_config import parse_adapter_config
from merger.core.lora import ParsedAdapter, parse_adapter
from merger.errors import InputError, NonFiniteError
from merger.io.checkpoint import read_shard_header


@dataclass(frozen=True)
class LoadedAdapter:
    path: Path
    weights_file: Path
    sha256: str
    raw_config: dict
    parsed: ParsedAdapter


def sha256_file(path: Path, chunk: int = 16 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_adapter(path: Path, allow_pickle: bool = False) -> LoadedAdapter:
    import torch

    from merger.core.apply import all_finite

    path = Path(path)
    cfg_file = path / "adapter_config.json"
    if not cfg_file.exists():
        raise InputError(f"{path} has no adapter_config.json", "pass a PEFT adapter folder (save_pretrained output)")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{cfg_file} is not valid JSON ({exc.msg})", "re-save the adapter with PEFT") from exc
    config = parse_adapter_config(raw, str(path))
    st_file, bin_file = path / "adapter_model.safetensors", path / "adapter_model.bin"
    if st_file.exists():
        read_shard_header(st_file)  # refuses truncated files with a clear message
        from safetensors.torch import load_file

        try:
            tensors = load_file(st_file)
        except Exception as exc:  # safetensors raises its own types
            raise InputError(f"{st_file} cannot be read: {exc}", "re-save the adapter with PEFT") from exc
        weights = st_file
    elif bin_file.exists():
        if not allow_pickle:
            raise InputError(f"{bin_file} is a pickle, and loading a pickle can run arbitrary code",
                             "convert it to adapter_model.safetensors, or pass --allow-pickle to load it "
                             "with torch.load(weights_only=True)")
        try:
            tensors = torch.load(bin_file, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise InputError(f"{bin_file} cannot be loaded with weights_only=True: {exc}".splitlines()[0],
                             "convert it to safetensors in a trusted environment") from exc
        weights = bin_file
    else:
        raise InputError(f"{path} has no adapter_model.safetensors", "pass a PEFT adapter folder")
    for key, t in tensors.items():
        if t.is_floating_point() and not all_finite(t):
            raise NonFiniteError(f"adapter {path.name}: tensor {key} has NaN/Inf values",
                                 "the adapter is broken (check its training run); nothing was written")
    parsed = parse_adapter(path.name, config, tensors)
    return LoadedAdapter(path, weights, sha256_file(weights), raw, parsed)
