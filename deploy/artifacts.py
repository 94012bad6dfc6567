"""Artifact folders on disk: fingerprints for reuse, staging, durable publication, safe removal.

Every artifact is built under `<state>/artifacts/.staging-<job>/`, fsynced, renamed into
`<state>/artifacts/<name>` and the parent folder fsynced, so a crash leaves either the whole artifact
or none of it. Nothing that a live route or a rollback target uses is ever deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from deploy.errors import DeployError
from merger.io.adapter import sha256_file as file_sha256

WEIGHT_SUFFIXES = (".safetensors", ".json", ".model", ".txt", ".jinja")


def fingerprint(base: Path, adapter: Path, options: dict) -> str:
    """What an artifact was made from, and how. The adapter's files are hashed (they are small); the
    base's shards enter by name, size and mtime, so a multi-GB base is not re-read on every promote."""
    h = hashlib.sha256()
    for f in sorted(p for p in adapter.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES):
        h.update(f.name.encode())
        h.update(file_sha256(f).encode())
    for f in sorted(p for p in base.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(json.dumps(options, sort_keys=True).encode())
    return h.hexdigest()


def tree_sha256(folder: Path) -> str:
    """One hash over the folder's safetensors shards (names and contents)."""
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        h.update(f.name.encode())
        h.update(file_sha256(f).encode())
    return h.hexdigest()


def _fsync_tree(folder: Path) -> None:
    for root, _dirs, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(staged: Path, final: Path) -> Path:
    """Make `staged` durable and rename it to `final` (which must not exist)."""
    if final.exists():
        raise DeployError(f"artifact {final} already exists", "remove it, or let promote reuse it")
    _fsync_tree(staged)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.rename(staged, final)
    _fsync_dir(final.parent)
    return final


def remove_unused(path: Path, in_use: set[Path]) -> bool:
    """Delete an artifact folder unless a live route or rollback target uses it. True if removed."""
    resolved = path.resolve()
    if any(resolved == p.resolve() for p in in_use):
        return False
    shutil.rmtree(path, ignore_errors=True)
    return not path.exists()
