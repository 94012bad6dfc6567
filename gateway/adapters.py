"""Adapter folders on disk, checked before vLLM sees them (the rules live in core.adapter_checks).

Reads only safetensors headers (at most MAX_HEADER_BYTES each), never tensor data, and never unpickles.
"""

from __future__ import annotations

import os
from pathlib import Path

from gateway.core.adapter_checks import (
    MAX_HEADER_BYTES,
    PICKLE_SUFFIXES,
    AdapterSummary,
    TensorInfo,
    base_shapes,
    check_adapter,
    header_length,
    parse_adapter_config,
    parse_header,
)
from gateway.core.errors import AdapterRejected

WEIGHTS = "adapter_model.safetensors"


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = header_length(f.read(8), size)
        header = f.read(min(n, MAX_HEADER_BYTES))
    return parse_header(header, size - 8 - n)


def resolve_under(path: str | Path, root: Path | None) -> Path:
    """`path` with symlinks resolved; it must lie under `root` (also resolved)."""
    if root is None:
        raise AdapterRejected("no adapters root is configured, so no adapter path is accepted",
                              "set gateway.adapters_root in switchyard.toml or SWITCHYARD_ADAPTERS_ROOT")
    real_root = Path(os.path.realpath(root))
    candidate = Path(path)
    if not candidate.is_absolute():
        candidate = real_root / candidate
    real = Path(os.path.realpath(candidate))
    if not real.is_relative_to(real_root):
        raise AdapterRejected(f"adapter path {str(path)!r} is outside the adapters root",
                              f"copy the adapter under {real_root}")
    if not real.is_dir():
        raise AdapterRejected(f"adapter path {str(path)!r} is not a folder", f"pass a PEFT adapter folder under {real_root}")
    return real


def _trusted_folder(path: str | Path) -> Path:
    real = Path(os.path.realpath(path))
    if not real.is_dir():
        raise AdapterRejected(f"adapter path {str(path)!r} is not a folder", "pass a PEFT adapter folder")
    return real


def load_base_shapes(model_dir: Path) -> dict[str, tuple[int, int]]:
    """Module -> (out, in) from every safetensors file of a base checkpoint folder (headers only)."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise AdapterRejected(f"the base checkpoint {model_dir} has no safetensors files",
                              "adapters can only be checked against a safetensors base")
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        tensors.update(read_safetensors_header(f))
    return base_shapes(tensors)


def inspect_adapter(path: str | Path, *, root: Path | None, base: dict[str, tuple[int, int]],
                    max_lora_rank: int) -> tuple[Path, AdapterSummary]:
    """The resolved folder and what it holds, or AdapterRejected saying why vLLM must not see it.
    `root=None` skips only the root check, for trusted callers (adapters named in the deployment
    file); the admin API always passes its configured root."""
    folder = resolve_under(path, root) if root is not None else _trusted_folder(path)
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise AdapterRejected(f"the adapter folder holds pickle files ({', '.join(pickles)})",
                              "keep only adapter_config.json and adapter_model.safetensors (no pickle is loaded)")
    cfg_path, weights = folder / "adapter_config.json", folder / WEIGHTS
    if not cfg_path.is_file():
        raise AdapterRejected("the adapter folder has no adapter_config.json", "save it with PEFT's save_pretrained")
    if not weights.is_file():
        raise AdapterRejected(f"the adapter folder has no {WEIGHTS}", "save it with safe_serialization=True")
    try:
        cfg = parse_adapter_config(cfg_path.read_text())
        tensors = read_safetensors_header(weights)
    except OSError as exc:
        raise AdapterRejected(f"cannot read the adapter: {exc.strerror}", "check the folder's permissions") from None
    return folder, check_adapter(cfg, tensors, base, max_lora_rank)
