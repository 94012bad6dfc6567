"""O_DIRECT shard writes: exactly the bytes given, the file's exact length, and a fallback to plain
writes wherever the file system refuses O_DIRECT (at open or at the first write)."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from merger.errors import OutputError
from merger.io import directwrite
from merger.io.directwrite import ALIGN, STAGING_BYTES, DirectFile

SIZES = (1, ALIGN - 1, ALIGN + 1, STAGING_BYTES, STAGING_BYTES - 5, 2 * STAGING_BYTES + 7, 0, 123)


def _parts() -> list[bytes]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in SIZES]


def _direct_or_skip(path) -> DirectFile:
    f = DirectFile.open(path)
    if f is None:
        pytest.skip(f"the file system under {path.parent} refuses O_DIRECT")
    return f


def test_bytes_and_length_are_exact_across_staging_boundaries(tmp_path):
    parts = _parts()
    f = _direct_or_skip(tmp_path / "x.bin")
    for p in parts:
        f.write(p)
    f.write(memoryview(np.arange(1000, dtype=np.float32)))  # a typed view is written as its bytes
    f.close()
    want = b"".join(parts) + np.arange(1000, dtype=np.float32).tobytes()
    assert f.direct and (tmp_path / "x.bin").read_bytes() == want


def _failing_write(monkeypatch, nth: int, err: int) -> list[int]:
    """os.write, as directwrite sees it, fails with `err` on its `nth` call; returns the calls' lengths."""
    real, calls = os.write, []

    def write(fd, data):
        calls.append(len(data))
        if len(calls) == nth:
            raise OSError(err, os.strerror(err))
        return real(fd, data)

    monkeypatch.setattr(directwrite.os, "write", write)
    return calls


def test_refused_at_the_first_write_carries_on_with_plain_writes(tmp_path, monkeypatch):
    f = _direct_or_skip(tmp_path / "x.bin")
    calls = _failing_write(monkeypatch, 1, errno.EINVAL)
    parts = _parts()
    for p in parts:
        f.write(p)
    f.close()
    assert not f.direct and len(calls) > 1
    assert (tmp_path / "x.bin").read_bytes() == b"".join(parts)


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EINVAL])  # EINVAL too: only a first write falls back
def test_a_failure_after_bytes_landed_is_raised_not_retried(tmp_path, monkeypatch, err):
    f = _direct_or_skip(tmp_path / "x.bin")
    calls = _failing_write(monkeypatch, 2, err)
    with pytest.raises(OSError) as exc:
        f.write(bytes(3 * STAGING_BYTES))
    assert exc.value.errno == err and len(calls) == 2
    f.abort()


def test_the_shard_writer_maps_disk_full_and_falls_back_where_open_is_refused(tmp_path, monkeypatch):
    from safetensors.numpy import load_file

    from merger.io.writer import OutTensor, StreamingShardWriter, plan_shards

    a = np.arange(3 * STAGING_BYTES // 4 + 3, dtype=np.float32)
    (plan,) = plan_shards([OutTensor("a", "F32", a.shape)], 1 << 30)

    # O_DIRECT refused at open (tmpfs does that): the page-cache path writes the same shard
    real_open = os.open
    monkeypatch.setattr(directwrite.os, "open", lambda path, flags, *mode: (
        (_ for _ in ()).throw(OSError(errno.EINVAL, "Invalid argument")) if flags & os.O_DIRECT
        else real_open(path, flags, *mode)))
    (tmp_path / "page").mkdir()
    writer = StreamingShardWriter(tmp_path / "page", [plan])
    seen = []

    def parts():  # the shard is open (and closed once its last tensor is written)
        seen.append(writer._open_shards[0].direct)
        yield a

    writer.write_parts("a", parts())
    assert seen == [None]
    writer.close()
    assert np.array_equal(load_file(tmp_path / "page" / plan.filename)["a"], a)
    monkeypatch.setattr(directwrite.os, "open", real_open)

    # disk full during a direct write: the merge's usual error, naming the shard and the fix
    (tmp_path / "full").mkdir()
    writer = StreamingShardWriter(tmp_path / "full", [plan])
    if DirectFile.open(tmp_path / "probe.bin") is None:
        pytest.skip("no O_DIRECT here")
    real_write = os.write

    def full(fd, data):
        if os.lseek(fd, 0, os.SEEK_CUR) > 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(directwrite.os, "write", full)
    with pytest.raises(OutputError, match="disk full while writing model.safetensors"):
        writer.write("a", a)
        writer.close()
    writer.abort()


def test_switched_off_by_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SWITCHYARD_DIRECT_IO", "0")
    assert DirectFile.open(tmp_path / "x.bin") is None and not (tmp_path / "x.bin").exists()


def _aligned(n: int, seed: int) -> memoryview:
    """n random bytes in a page-aligned anonymous map, like the merge's output buffers."""
    import mmap

    buf = mmap.mmap(-1, n)
    buf[:] = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()
    return memoryview(buf)


def test_aligned_buffers_are_written_in_place_and_the_rest_is_staged(tmp_path, monkeypatch):
    f = _direct_or_skip(tmp_path / "x.bin")
    calls = _failing_write(monkeypatch, 0, 0)  # records the lengths, fails nothing
    big = _aligned(3 * ALIGN * 256 + 100, 1)  # aligned address, length not a multiple of ALIGN
    parts = [bytes(2 * ALIGN), big,  # staged, then in place after flushing the staged (aligned) bytes
             b"x" * 10, _aligned(ALIGN * 512, 2),  # file position now unaligned: staged
             _aligned(ALIGN * 512 + 1, 3)[1:]]  # unaligned address: staged
    for p in parts:
        f.write(p)
    f.close()
    assert (tmp_path / "x.bin").read_bytes() == b"".join(bytes(p) for p in parts)
    assert calls[:2] == [2 * ALIGN, 3 * ALIGN * 256]  # the staged head, then the buffer from where it lies
    assert f.zero_copy


def test_a_refused_in_place_write_is_staged_instead(tmp_path, monkeypatch):
    f = _direct_or_skip(tmp_path / "x.bin")
    f.write(bytes(ALIGN))
    big = _aligned(ALIGN * 300, 4)
    calls = _failing_write(monkeypatch, 2, errno.EINVAL)  # the in-place write
    f.write(big)
    f.write(_aligned(ALIGN * 300, 5))  # staged too: no second try in place
    f.close()
    assert not f.zero_copy and f.direct
    assert calls[:2] == [ALIGN, ALIGN * 300] and all(n <= STAGING_BYTES for n in calls[2:])
    assert (tmp_path / "x.bin").read_bytes() == bytes(ALIGN) + bytes(big) + bytes(_aligned(ALIGN * 300, 5))


def test_merging_a_merged_model_writes_untouched_tensors_in_place_from_its_map(tmp_path, monkeypatch):
    """A switchyard output as the base (a second promote): its data is page-aligned, so untouched
    tensors go to O_DIRECT straight from the read-only file map. Same bytes as the page-cache path."""
    import torch

    from merger.api import merge
    from tests.merger.common import make_adapter, tiny_model

    _direct_or_skip(tmp_path / "probe.bin").abort()
    base = tiny_model(tmp_path / "base", dtype=torch.bfloat16)
    adapter = make_adapter(base, tmp_path / "adapter", r=4, target_modules=["q_proj"])
    first = merge(base, [adapter], tmp_path / "first").out
    monkeypatch.setattr(directwrite, "ZERO_COPY_BYTES", ALIGN)  # the tiny model's tensors are small
    in_place = []
    real = DirectFile._write_in_place
    monkeypatch.setattr(DirectFile, "_write_in_place", lambda self, view: in_place.append(real(self, view)) or in_place[-1])
    direct = merge(first, [adapter], tmp_path / "direct").out
    assert in_place and all(n > 0 for n in in_place)
    monkeypatch.setenv("SWITCHYARD_DIRECT_IO", "0")
    cached = merge(first, [adapter], tmp_path / "cached").out
    assert (direct / "model.safetensors").read_bytes() == (cached / "model.safetensors").read_bytes()
