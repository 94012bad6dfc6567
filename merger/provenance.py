"""`switchyard.json`: what was merged into what, how, by which versions, and with what rounding loss.

Base shard hashes come, in order of preference, from the Hugging Face cache layout
(`.../snapshots/<commit>/`: the Hub commit names the exact files), from a local cache keyed by
(real path, size, mtime) so a base is hashed once, or from the bytes streamed during the merge.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict
from pathlib import Path
from typing import Optional

SCHEMA = "switchyard.merge/v1"
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def hub_commit(base: Path) -> Optional[str]:
    """The Hub commit of a base inside the HF cache (…/models--org--name/snapshots/<sha>/)."""
    p = base.resolve() if not base.is_symlink() else base.absolute()
    if p.parent.name == "snapshots" and _COMMIT.match(p.name):
        return p.name
    return None


def _cache_file() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return root / "switchyard" / "sha256.json"


def _key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def cached_hashes(paths: list[Path]) -> dict[str, str]:
    """file name -> sha256 for the files whose (path, size, mtime) is in the local cache."""
    try:
        cache = json.loads(_cache_file().read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return {p.name: cache[_key(p)] for p in paths if _key(p) in cache}


def remember_hashes(paths: dict[Path, str]) -> None:
    """Best effort: a read-only home only means hashing again next time."""
    f = _cache_file()
    try:
        cache = json.loads(f.read_text()) if f.exists() else {}
        cache.update({_key(p): h for p, h in paths.items()})
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(cache, indent=0))
        tmp.replace(f)
    except (OSError, json.JSONDecodeError):
        pass


def peak_rss_bytes() -> int:
    """This process's peak resident memory: the high-water mark of its own address space (VmHWM).
    Not ru_maxrss: on Linux that keeps the parent's peak across fork + exec, so a merge started by a
    large process (pytest, a server) reported the parent's."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def library_versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for name in ("switchyard", "torch", "safetensors", "peft", "transformers"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def rounding_summary(stats, out_dtype_note: str) -> dict:
    """Totals over all merged tensors plus the worst tensors; `stats` are TensorStats."""
    nonzero = sum(s.delta_nonzero for s in stats)
    vanished = sum(s.vanished for s in stats)
    worst = sorted(stats, key=lambda s: s.delta_rel_error, reverse=True)
    nf4 = [s for s in stats if s.nf4_ratio is not None and s.delta_nonzero]
    return {
        "output_dtype": out_dtype_note,
        "tensors_merged": len(stats),
        "delta_entries": nonzero,
        "vanished_entries": vanished,
        "vanished_share": vanished / nonzero if nonzero else 0.0,
        "worst_rel_error": max((s.rel_error for s in stats), default=0.0),
        "worst_delta_rel_error": worst[0].delta_rel_error if worst else 0.0,
        "worst_tensors": [asdict(s) for s in worst[:5]],
        "per_tensor": {s.name: {"vanished_share": s.vanished / s.delta_nonzero if s.delta_nonzero else 0.0,
                                "rel_error": s.rel_error, "delta_rel_error": s.delta_rel_error}
                       for s in stats},
        **({"nf4_quant_error_over_delta": {s.name: s.nf4_ratio for s in nf4}} if nf4 else {}),
    }


def model_card(prov: dict) -> str:
    adapters = ", ".join(f"`{a['path']}` (sha256 {a['sha256'][:12]})" for a in prov["adapters"])
    r = prov["rounding"]
    lines = [
        f"# {Path(prov['output']['path']).name}",
        "",
        f"Merged by switchyard from base `{prov['base']['path']}` and adapter(s) {adapters}.",
        "",
        f"- combine: {prov['options']['combine']}, dtype: {prov['options']['dtype']}, "
        f"qlora base: {prov['options']['qlora_base']}",
        f"- tensors merged: {r['tensors_merged']}; delta entries rounded away: {r['vanished_share']:.3%}",
        *[f"- note: {n}" for n in prov.get("notes", [])],
        "",
        "Full provenance (hashes, versions, options, rounding loss): `switchyard.json`.",
        "",
    ]
    return "\n".join(lines)
