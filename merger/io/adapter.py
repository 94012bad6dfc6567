"""Load a PEFT adapter folder: adapter_config.json + adapter_model.safetensors (a `.bin` pickle only
with allow_pickle, through `torch.load(weights_only=True)`).

A safetensors adapter is not copied into memory: its tensors are views into a private (copy-on-write)
memory map of the file, whose pages are dropped after the load's NaN/Inf check and again after each
base tensor that used them is written (`AdapterPages.release`). An 8B model's rank-16 fp32 adapter
is 168 MB; this way it costs a module's pages at a time instead. A pickled adapter is held whole.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from merger.core.adapter_config import parse_adapter_config
from merger.core.lora import ParsedAdapter, parse_adapter
from merger.errors import InputError, NonFiniteError
from merger.io.checkpoint import DTYPE_SIZES, drop_pages, has_nonfinite, read_shard_header


class AdapterPages:
    """A private memory map of an adapter's safetensors file, and the tensors viewed from it.

    `release` drops the pages behind tensors that lie inside this map (anything else is ignored:
    dropping the pages of ordinary memory would zero it). The pages come back from the page cache
    on the next read, so a released tensor stays valid; nothing writes to these tensors, and a write
    would only touch the process's private copy, never the file.
    """

    def __init__(self, path: Path) -> None:
        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        self._view = memoryview(self._map)
        self._base = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
        self.size = len(self._map)

    def raw(self, info) -> memoryview:
        return self._view[info.begin:info.end]

    def tensors(self, header, arrays: str = "torch") -> dict:
        """The header's tensors as views of the map: torch tensors, or numpy arrays (merger/core/fast.py)."""
        out = {}
        if arrays == "numpy":
            import numpy as np

            from merger.core.fast import ST_TO_NUMPY

            for info in header.tensors:
                out[info.name] = np.frombuffer(self.raw(info), dtype=ST_TO_NUMPY[info.dtype]).reshape(info.shape)
            return out
        import torch

        from merger.core.apply import ST_TO_TORCH

        for info in header.tensors:
            t = torch.frombuffer(self._view[info.begin:info.end], dtype=ST_TO_TORCH[info.dtype]) \
                if info.nbytes else torch.empty(0, dtype=ST_TO_TORCH[info.dtype])
            out[info.name] = t.reshape(info.shape)
        return out

    def release(self, tensors) -> int:
        """Drop the pages of those `tensors` that view this map; returns the bytes dropped."""
        dropped = 0
        for t in tensors:
            if t is None or not t.nbytes:
                continue
            begin = (t.data_ptr() if hasattr(t, "data_ptr") else t.ctypes.data) - self._base
            end = begin + t.nbytes
            if 0 <= begin and end <= self.size:  # else not ours
                dropped += drop_pages(self._map, begin, end)
        return dropped

    def release_all(self) -> None:
        drop_pages(self._map, 0, self.size)


def _mappable(header, arrays: str = "torch") -> bool:
    if arrays == "numpy":
        from merger.core.fast import ST_TO_NUMPY as known
    else:
        from merger.core.apply import ST_TO_TORCH as known

    # views need dtypes the array library has and offsets aligned to the element size (else: read a copy)
    return hasattr(mmap.mmap, "madvise") and all(
        i.dtype in known and i.begin % DTYPE_SIZES[i.dtype] == 0 for i in header.tensors)


@dataclass(frozen=True)
class LoadedAdapter:
    path: Path
    weights_file: Path
    sha256: str
    raw_config: dict
    parsed: ParsedAdapter
    pages: Optional[AdapterPages] = None  # the memory map the tensors view (None: held in memory)


def _nonfinite(path: Path, key: str) -> NonFiniteError:
    return NonFiniteError(f"adapter {path.name}: tensor {key} has NaN/Inf values",
                          "the adapter is broken (check its training run); nothing was written")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                h.update(m)  # no copy through a read buffer; drops the GIL
    return h.hexdigest()


def load_adapter(path: Path, allow_pickle: bool = False, arrays: str = "torch",
                 sha256: Callable[[Path], str] = sha256_file) -> Optional[LoadedAdapter]:
    """`arrays`: "torch", or "numpy" for the torch-free merge (merger/core/fast.py), which returns None
    where numpy cannot view the weights (a pickle, a dtype numpy lacks): load it with torch then.
    `sha256`: hashes the weights file (merger/io/early.py's EarlyFiles: hashed ahead)."""
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
    pages = None
    if arrays == "numpy":
        if not st_file.exists():
            return None
        header = read_shard_header(st_file)  # refuses truncated files with a clear message
        if not _mappable(header, "numpy"):
            return None
        pages = AdapterPages(st_file)
        for info in header.tensors:
            if has_nonfinite(pages.raw(info), info.dtype):
                raise _nonfinite(path, info.name)
        pages.release_all()  # the check read every page; the merge reads them again module by module
        parsed = parse_adapter(path.name, config, pages.tensors(header, "numpy"))
        return LoadedAdapter(path, st_file, sha256(st_file), raw, parsed, pages)
    import torch

    from merger.core.apply import all_finite

    if st_file.exists():
        header = read_shard_header(st_file)  # refuses truncated files with a clear message
        if _mappable(header):
            pages = AdapterPages(st_file)
            tensors = pages.tensors(header)
        else:
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
            raise _nonfinite(path, key)
    if pages is not None:
        pages.release_all()  # the check read every page; the merge reads them again module by module
    parsed = parse_adapter(path.name, config, tensors)
    return LoadedAdapter(path, weights, sha256(weights), raw, parsed, pages)
