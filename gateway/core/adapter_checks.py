"""Checks on a LoRA adapter folder's contents, before vLLM ever sees it.

vLLM accepts any absolute path, falls back to a Hub download for anything else, unpickles
`adapter_model.bin`, and silently serves the base model when no target module matches. So the
gateway accepts only: an `adapter_config.json` for a plain LoRA, weights in safetensors whose header
and byte ranges are valid, every rank within the engine's `max_lora_rank`, and lora_A/lora_B pairs
for modules that exist in the base with shapes that fit them.

Pure: the edge (`gateway.adapters`) reads the bytes; these functions only judge them.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from typing import Mapping

from pydantic import BaseModel, ConfigDict, ValidationError

from gateway.core.errors import AdapterRejected

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<side>[AB])(?:\.[^.]+)?\.weight$")


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int  # byte offsets into the data section (after the header)
    end: int


class AdapterConfig(BaseModel):
    """The fields of PEFT's adapter_config.json that decide whether vLLM can serve it."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    peft_type: str = "LORA"
    r: int
    lora_alpha: float = 8
    target_modules: list[str] | str
    rank_pattern: dict[str, int] = {}
    modules_to_save: list[str] | None = None
    use_dora: bool = False
    base_model_name_or_path: str | None = None


@dataclass(frozen=True)
class AdapterSummary:
    rank: int
    modules: tuple[str, ...]  # base module names the adapter changes
    tensors: int


def header_length(first8: bytes, file_size: int) -> int:
    """The JSON header's length from a safetensors file's first 8 bytes, checked against the file."""
    if len(first8) < 8:
        raise AdapterRejected("the safetensors file is shorter than 8 bytes", "re-save the adapter with safetensors")
    (n,) = struct.unpack("<Q", first8)
    if n == 0 or n > MAX_HEADER_BYTES or 8 + n > file_size:
        raise AdapterRejected(f"the safetensors header length {n} does not fit a {file_size}-byte file",
                              "the weights file is corrupt or not safetensors")
    return n


def parse_header(header: bytes, data_size: int) -> dict[str, TensorInfo]:
    """Tensors of a safetensors header. Every byte range must lie inside the data section, match its
    dtype and shape, and not overlap another."""
    try:
        raw = json.loads(header)
    except (ValueError, UnicodeDecodeError):
        raise AdapterRejected("the safetensors header is not valid JSON", "the weights file is corrupt") from None
    if not isinstance(raw, dict):
        raise AdapterRejected("the safetensors header is not a JSON object", "the weights file is corrupt")
    tensors: dict[str, TensorInfo] = {}
    for name, spec in raw.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = spec["dtype"], tuple(spec["shape"]), spec["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise AdapterRejected(f"tensor {name!r} has a malformed header entry", "the weights file is corrupt") from None
        if dtype not in DTYPE_BYTES:
            raise AdapterRejected(f"tensor {name!r} has unknown dtype {dtype!r}", "save LoRA weights as F32/F16/BF16")
        if not all(isinstance(d, int) and d >= 0 for d in shape) or not all(isinstance(o, int) for o in (start, end)):
            raise AdapterRejected(f"tensor {name!r} has a malformed shape or offsets", "the weights file is corrupt")
        if not 0 <= start <= end <= data_size or end - start != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise AdapterRejected(f"tensor {name!r}: bytes {start}..{end} do not match its shape {list(shape)} "
                                  f"and dtype {dtype} inside a {data_size}-byte data section",
                                  "the weights file is corrupt or truncated")
        tensors[name] = TensorInfo(dtype, shape, start, end)
    ranges = sorted((t.start, t.end, n) for n, t in tensors.items() if t.end > t.start)
    for (_, end_a, a), (start_b, _, b) in zip(ranges, ranges[1:]):
        if start_b < end_a:
            raise AdapterRejected(f"tensors {a!r} and {b!r} overlap in the weights file", "the weights file is corrupt")
    return tensors


def parse_adapter_config(text: str) -> AdapterConfig:
    try:
        cfg = AdapterConfig.model_validate(json.loads(text))
    except (ValueError, ValidationError) as exc:
        first = exc.errors()[0] if isinstance(exc, ValidationError) else {"loc": (), "msg": str(exc)}
        key = ".".join(map(str, first["loc"])) or "(top level)"
        raise AdapterRejected(f"adapter_config.json: {key}: {first['msg']}", "write it with PEFT's save_pretrained") from None
    if cfg.peft_type.upper() != "LORA":
        raise AdapterRejected(f"adapter_config.json: peft_type is {cfg.peft_type!r}", "only LoRA adapters are served")
    if cfg.use_dora:
        raise AdapterRejected("the adapter uses DoRA", "merge it instead (switchyard merge), vLLM serves plain LoRA")
    if cfg.modules_to_save:
        raise AdapterRejected(f"the adapter has modules_to_save {cfg.modules_to_save}",
                              "vLLM cannot serve fully trained modules: merge the adapter instead")
    return cfg


def base_shapes(tensors: Mapping[str, TensorInfo]) -> dict[str, tuple[int, int]]:
    """Module name -> (out_features, in_features) for every 2-D `.weight` of a base checkpoint."""
    return {name[: -len(".weight")]: t.shape for name, t in tensors.items()
            if name.endswith(".weight") and len(t.shape) == 2}


def _targets(module: str, target_modules: list[str] | str) -> bool:
    if isinstance(target_modules, str):  # PEFT: a string is a regex matched against the full name
        return re.fullmatch(target_modules, module) is not None
    return any(module == t or module.endswith("." + t) for t in target_modules)


def check_adapter(cfg: AdapterConfig, tensors: Mapping[str, TensorInfo],
                  base: Mapping[str, tuple[int, int]], max_lora_rank: int) -> AdapterSummary:
    """Raise AdapterRejected unless every tensor is half of a lora_A/lora_B pair for a module of the
    base, with A: (r, in) and B: (out, r), r <= max_lora_rank, and the config's targets hit the base."""
    ranks = [cfg.r, *cfg.rank_pattern.values()]
    if max(ranks) > max_lora_rank or min(ranks) < 1:
        raise AdapterRejected(f"the adapter's rank {max(ranks)} is outside 1..{max_lora_rank} (the engine's max_lora_rank)",
                              "retrain with a smaller r, raise engine.max_lora_rank, or merge it instead")
    if not any(_targets(m, cfg.target_modules) for m in base):
        raise AdapterRejected(f"target_modules {cfg.target_modules!r} match no module of the base model",
                              "the adapter was trained for another architecture; vLLM would silently serve the base")
    pairs: dict[str, dict[str, TensorInfo]] = {}
    for key, t in tensors.items():
        m = _LORA_KEY.match(key)
        if m is None:
            raise AdapterRejected(f"unsupported tensor {key!r} in the adapter", "only lora_A/lora_B weights are served")
        module = m["module"].removeprefix(_PEFT_PREFIX)
        pairs.setdefault(module, {})[m["side"]] = t
    if not pairs:
        raise AdapterRejected("the adapter's weights file holds no tensors", "re-save the adapter")
    for module, sides in pairs.items():
        if module not in base:
            raise AdapterRejected(f"the adapter changes {module!r}, which the base model does not have",
                                  "it was trained for another base model")
        if set(sides) != {"A", "B"}:
            raise AdapterRejected(f"{module!r} has lora_{''.join(sides)} without its pair", "re-save the adapter")
        out_f, in_f = base[module]
        a, b = sides["A"].shape, sides["B"].shape
        if len(a) != 2 or len(b) != 2 or a[1] != in_f or b[0] != out_f or a[0] != b[1]:
            raise AdapterRejected(f"{module!r}: lora_A {list(a)} and lora_B {list(b)} do not fit the base weight "
                                  f"[{out_f}, {in_f}]", "it was trained for another base model")
        if not 1 <= a[0] <= max_lora_rank:
            raise AdapterRejected(f"{module!r} has rank {a[0]}, above the engine's max_lora_rank {max_lora_rank}",
                                  "retrain with a smaller r, raise engine.max_lora_rank, or merge it instead")
    return AdapterSummary(rank=max(ranks), modules=tuple(sorted(pairs)), tensors=len(tensors))
