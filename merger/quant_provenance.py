"""The `"quantization"` entry of `switchyard.json`, and what quantize reads from the merge's entry.

`switchyard.json` is the provenance file in every output folder. Quantize keeps every key the merged
model's file has and adds one, `"quantization"`:

    {"method": "awq", "scheme": "W4A16", "group_size": 128, "format": "pack-quantized",
     "ignore": ["lm_head"], "calibration": {"source": "builtin" | "<path>", "samples": 64,
     "tokens": 1500, "seq_len": 512, "dtype": "float32"}, "libraries": {"llmcompressor": "0.14.0.1", ...},
     "architecture": "LlamaForCausalLM", "source_model": "<path>", "shards": {"model.safetensors":
     "<sha256>"}, "report": {...QuantizeReport.to_dict()}, "created_at": "<ISO 8601 UTC>"}
"""

from __future__ import annotations

from merger.io.adapter import sha256_file as file_sha256

from datetime import datetime
from pathlib import Path


def shard_digests(folder: Path) -> dict[str, str]:
    """sha256 of every `*.safetensors` shard in `folder`, by file name."""
    return {p.name: file_sha256(p) for p in sorted(folder.glob("*.safetensors"))}


def weights_size(folder: Path) -> int:
    """Bytes of the weight shards (`*.safetensors`), the part quantization shrinks."""
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def _adapter_candidates(prov: dict, kind: str) -> list[object]:
    """Where a merge's provenance leads to the adapter's `kind` ("eval" or "train") set, most specific
    first: an explicit key, then (one adapter merged) files beside the adapter: `<adapter>/<kind>.jsonl`
    and the demo's layout `<root>/adapters/<name>` -> `<root>/<kind>/<name>.jsonl`."""
    adapter = prov.get("adapter") if isinstance(prov.get("adapter"), dict) else {}
    adapters = prov.get("adapters") if isinstance(prov.get("adapters"), list) else []
    first = adapters[0] if len(adapters) == 1 and isinstance(adapters[0], dict) else {}
    found: list[object] = [adapter.get(kind), adapter.get(f"{kind}_set"), first.get(kind), prov.get(kind),
                           prov.get(f"{kind}_set")]
    if isinstance(first.get("path"), str) and first["path"]:
        folder = Path(first["path"])
        names = [folder.name] + ([first["name"]] if isinstance(first.get("name"), str) else [])
        found.append(str(folder / f"{kind}.jsonl"))
        found += [str(folder.parent.parent / kind / f"{n}.jsonl") for n in names]
    return found


def _first_file(candidates: list[object], model: Path) -> Path | None:
    """The first candidate naming an existing file; relative paths are tried against the model folder, then cwd."""
    for value in candidates:
        if isinstance(value, dict):
            value = value.get("path")
        if not isinstance(value, str) or not value:
            continue
        for path in (model / value, Path(value)):
            if path.is_file():
                return path.resolve()
    return None


def eval_set_from_provenance(prov: dict | None, model: Path) -> Path | None:
    """The adapter's eval JSONL that a merge's `switchyard.json` leads to, if it exists."""
    return _first_file(_adapter_candidates(prov, "eval"), model) if prov else None


def calibration_set_from_provenance(prov: dict | None, model: Path) -> Path | None:
    """The adapter's training prompts if they can be found (calibrating on the eval set would let the
    accuracy report see its own calibration data), else its eval set."""
    if not prov:
        return None
    return _first_file(_adapter_candidates(prov, "train"), model) or eval_set_from_provenance(prov, model)


def quantization_record(options, source_model: Path, calibration_source: str, quantize_result: dict,
                        report: dict, shards: dict[str, str], now: datetime) -> dict:
    """The `"quantization"` value (see the module docstring); `options` is a QuantizeOptions."""
    return {
        "method": options.method,
        "scheme": options.scheme,
        "group_size": options.group_size,
        "format": "pack-quantized",
        "ignore": list(options.ignore),
        "calibration": {
            "source": calibration_source,
            "samples": quantize_result["samples"],
            "tokens": quantize_result["tokens"],
            "seq_len": options.seq_len,
            "dtype": quantize_result.get("calibration_dtype"),
        },
        "awq_grid": options.n_grid,
        "architecture": quantize_result.get("architecture"),
        "source_model": str(source_model),
        "libraries": quantize_result.get("libraries", {}),
        "shards": shards,
        "report": report,
        "created_at": now.isoformat(),
    }
