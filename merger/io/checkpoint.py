"""Read a Hugging Face safetensors checkpoint one tensor at a time.

Only the headers are parsed up front (a few KB per shard). Tensor bytes are read through a memory
map of the shard and the pages are dropped again (`MADV_DONTNEED`) once the caller is done with
them, so resident memory stays at one tensor per reader however large the shard is.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from merger.errors import InputError

# safetensors dtype name -> bytes per element
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
MAX_HEADER_BYTES = 100 << 20


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: `begin`/`end` are absolute byte offsets in `shard`."""

    name: str
    shard: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class ShardHeader:
    path: Path
    data_start: int  # 8 + header length
    size: int
    metadata: dict
    tensors: tuple[TensorInfo, ...]


def read_shard_header(path: Path) -> ShardHeader:
    """Parse and check one shard's header; a truncated or malformed file raises InputError."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise InputError(f"{path} is truncated ({size} bytes): not a safetensors file",
                                 "re-download or re-save the checkpoint")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise InputError(f"{path} has a header of {n} bytes but the file is {size} bytes: "
                                 "truncated or not safetensors", "re-download or re-save the checkpoint")
            header = json.loads(f.read(n))
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}", "check the path and permissions") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} has a corrupt safetensors header", "re-download or re-save it") from exc
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    infos = []
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        dtype = entry["dtype"]
        shape = tuple(int(d) for d in entry["shape"])
        info = TensorInfo(name, path, dtype, shape, data_start + begin, data_start + end)
        if dtype not in DTYPE_SIZES or info.numel * DTYPE_SIZES[dtype] != info.nbytes:
            raise InputError(f"{path}: tensor {name} has inconsistent dtype/shape/offsets",
                             "the file is corrupt; re-save it")
        if info.end > size:
            raise InputError(f"{path} is truncated: tensor {name} ends at byte {info.end} of {size}",
                             "re-download or re-save the checkpoint")
        infos.append(info)
    infos.sort(key=lambda t: t.begin)
    return ShardHeader(path, data_start, size, metadata, tuple(infos))


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint folder's safetensors tensors (single file or index + shards)."""

    root: Path
    shards: tuple[ShardHeader, ...]
    tensors: dict  # name -> TensorInfo, in (shard, offset) order

    @classmethod
    def open(cls, root: Path, allow_pickle: bool = False) -> "Checkpoint":
        root = Path(root)
        if not root.is_dir():
            raise InputError(f"base checkpoint {root} is not a folder", "pass a Hugging Face checkpoint folder")
        index = root / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise InputError(f"{index} is not a valid safetensors index", "re-save the checkpoint") from exc
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (root / f).exists()]
            if missing:
                raise InputError(f"{root} is missing shard(s) {', '.join(missing)} named in its index",
                                 "copy the complete checkpoint")
        elif (root / "model.safetensors").exists():
            files = ["model.safetensors"]
        else:
            pickles = [p.name for p in root.glob("*.bin")] + [p.name for p in root.glob("*.pt")]
            if pickles:
                raise InputError(f"{root} holds only pickle weights ({pickles[0]}); switchyard merges "
                                 "safetensors checkpoints", "convert it with transformers: "
                                 "AutoModel.from_pretrained(...).save_pretrained(out, safe_serialization=True)")
            raise InputError(f"{root} has no model.safetensors or model.safetensors.index.json",
                             "pass a Hugging Face checkpoint folder")
        shards = tuple(read_shard_header(root / f) for f in files)
        tensors: dict[str, TensorInfo] = {}
        for shard in shards:
            for info in shard.tensors:
                if info.name in tensors:
                    raise InputError(f"tensor {info.name} appears in two shards of {root}", "re-save the checkpoint")
                tensors[info.name] = info
        return cls(root, shards, tensors)

    @property
    def total_bytes(self) -> int:
        return sum(s.size for s in self.shards)


class ShardReader:
    """Reads tensors of one shard through a memory map; `release` drops their pages again.

    Memory bound: the pages of the tensors read and not yet released (the executor keeps at most
    its queue depth of them).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "rb")
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        self._view = memoryview(self._map)
        if hasattr(self._map, "madvise"):
            self._map.madvise(mmap.MADV_SEQUENTIAL)

    def view(self, info: TensorInfo) -> memoryview:
        return self._view[info.begin:info.end]

    def release(self, begin: int, end: int) -> None:
        drop_pages(self._map, begin, end)

    def close(self) -> None:
        self._view.release()
        try:
            self._map.close()
        except BufferError:  # a caller still holds a view; the map goes with the last reference
            pass
        self._file.close()


def drop_pages(m: mmap.mmap, begin: int, end: int) -> int:
    """Drop the resident pages of bytes [begin, end) of a file map (rounded out to whole pages; they
    come back from the page cache on the next read). Returns the bytes dropped."""
    if not hasattr(m, "madvise"):
        return 0
    page = mmap.PAGESIZE
    start, stop = (begin // page) * page, min(len(m), -(-end // page) * page)
    if stop <= start:
        return 0
    m.madvise(mmap.MADV_DONTNEED, start, stop - start)
    return stop - start


def file_size(path: Path) -> int:
    return os.stat(path).st_size


# exponent bits of each float format: all ones means Inf or NaN
_EXPONENT = {"BF16": ("<u2", 0x7F80), "F16": ("<u2", 0x7C00), "F32": ("<u4", 0x7F800000),
             "F64": ("<u8", 0x7FF0000000000000)}


def has_nonfinite(data, dtype: str) -> bool:
    """NaN/Inf anywhere in raw little-endian float bytes (integers never are)."""
    import numpy as np

    if dtype not in _EXPONENT or not memoryview(data).nbytes:
        return False
    kind, mask = _EXPONENT[dtype]
    bits = np.frombuffer(data, dtype=kind)
    m = np.array(mask, dtype=kind)
    step = 1 << 20  # in slices, so the temporaries stay small whatever the tensor's size
    return any(bool(np.any((bits[i:i + step] & m) == m)) for i in range(0, bits.size, step))
