"""merger.io.early: the base hashed (or prefetched) ahead of the merge, at most `lead` bytes ahead,
started by `switchyard merge` before it imports torch."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time

import pytest

import merger.io.early as early_io
from merger import provenance
from merger.io.early import EarlyBase
from tests.merger.common import make_adapter, tiny_model


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("early") / "base", "llama")


def _settled(early: EarlyBase) -> int:
    """The position once it stops moving (the thread waits for the merge, or is done)."""
    last, stable = -1, 0
    for _ in range(200):
        pos = early.position
        stable = stable + 1 if pos == last else 0
        if stable >= 5:
            return pos
        last = pos
        time.sleep(0.01)
    raise AssertionError("the hasher never settled")


def test_the_hasher_stays_within_its_lead_of_the_merge(base, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(early_io, "SLICE_BYTES", 256)
    size = (base / "model.safetensors").stat().st_size
    assert size > 4096
    early = EarlyBase.start(base, lead=1024)
    assert early.hashing
    assert _settled(early) == 1024  # four slices, then it waits for the merge
    early.advance(2000)
    assert _settled(early) == 2816  # 2000 + 1024, rounded down to whole slices
    digests = early.result()  # the merge is over: the rest at once
    assert digests == {"model.safetensors": hashlib.sha256((base / "model.safetensors").read_bytes()).hexdigest()}
    assert early.position == size


def test_stop_ends_a_waiting_hasher_without_a_result(base, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(early_io, "SLICE_BYTES", 256)
    early = EarlyBase.start(base, lead=512)
    assert _settled(early) == 512
    early.stop()
    assert not early._thread.is_alive() and early._digests == {}
    with pytest.raises(RuntimeError, match="stopped before the end"):
        early.result()  # no partial hashes for the provenance


def test_a_cached_base_is_not_read(base, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    shard = base / "model.safetensors"
    provenance.remember_hashes({shard: "0" * 64})
    monkeypatch.setattr(early_io.mmap, "mmap", lambda *a, **k: pytest.fail("read a base whose hash is cached"))
    early = EarlyBase.start(base)
    assert not early.hashing and not early._thread.is_alive()
    assert early.result() == {"model.safetensors": "0" * 64}
    early.stop()


def test_an_unreadable_base_is_left_to_the_merge_to_report(tmp_path):
    assert EarlyBase.start(tmp_path / "missing") is None


def test_it_does_not_import_torch():
    code = "import sys, merger.io.early; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_the_merge_command_starts_it_before_importing_torch(base, tmp_path, monkeypatch):
    """`switchyard merge` hands the merge an EarlyBase for its base, started while torch was not yet
    imported (a fresh interpreter: the order is only visible there)."""
    adapter = make_adapter(base, tmp_path / "adapter", r=2, target_modules=["q_proj"])
    probe = (
        "import math, sys, merger.io.early as e\n"
        "real = e.EarlyBase.start.__func__\n"
        "seen = []\n"
        "def start(cls, *a, **k):\n"
        "    early = real(cls, *a, **k)\n"
        "    seen.append(('torch' in sys.modules, early))\n"
        "    return early\n"
        "e.EarlyBase.start = classmethod(start)\n"
        "from merger.cli import merge_command\n"
        f"merge_command({str(base)!r}, [{str(adapter)!r}], {str(tmp_path / 'out')!r}, 'auto', 'sequential', None, 0.5,"
        " 0, 'original', '2GB', 'cpu', False, False, False, True)\n"
        "assert len(seen) == 1, seen  # the merge used the command's, it started none of its own\n"
        "torch_before, early = seen[0]\n"
        "assert not torch_before and early.hashing and early._done == math.inf  # its result() was taken\n"
    )
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "out" / "switchyard.json").exists()


def test_early_files_hash_ahead_and_fall_back_to_hashing_now(tmp_path, monkeypatch):
    """The adapters' weights hashed in a thread of their own; a file it could not read, or was not
    given, is hashed on the caller's thread, which then raises what reading it raises."""
    from merger.io import early as early_mod

    a, b, empty = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "empty"
    a.write_bytes(b"a" * 100_000)
    b.write_bytes(b"b" * 10)
    empty.write_bytes(b"")
    files = early_mod.EarlyFiles.start([a, tmp_path / "missing", empty])
    files._thread.join(timeout=30)
    assert files._digests == {a: hashlib.sha256(b"a" * 100_000).hexdigest(), empty: hashlib.sha256(b"").hexdigest()}
    calls = []
    real = early_mod.sha256_file
    monkeypatch.setattr(early_mod, "sha256_file", lambda p: calls.append(p) or real(p))
    assert files.sha256(a) == hashlib.sha256(b"a" * 100_000).hexdigest() and calls == []  # hashed ahead
    assert files.sha256(b) == hashlib.sha256(b"b" * 10).hexdigest() and calls == [b]  # not given: now
    with pytest.raises(FileNotFoundError):
        files.sha256(tmp_path / "missing")


def test_a_merge_records_the_adapter_hash_the_early_thread_computed(tmp_path):
    import torch

    from merger.api import merge
    from merger.io.early import EarlyFiles


    base = tiny_model(tmp_path / "base", dtype=torch.bfloat16)
    adapter = make_adapter(base, tmp_path / "adapter", r=4, target_modules=["q_proj"])
    weights = adapter / "adapter_model.safetensors"
    files = EarlyFiles.start([weights])
    files._thread.join(timeout=30)
    files._digests[weights] = "e" * 64  # what the thread computed is what is recorded
    res = merge(base, [adapter], tmp_path / "out", early_files=files)
    assert res.provenance["adapters"][0]["sha256"] == "e" * 64
    plain = merge(base, [adapter], tmp_path / "plain")
    assert plain.provenance["adapters"][0]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
