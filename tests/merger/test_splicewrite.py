"""Bytes moved into a file by vmsplice + splice are exactly the bytes given, at the file's position,
from any buffer the merger hands over; a refusal falls back to write() with nothing half-written."""

from __future__ import annotations

import errno
import mmap
import os

import numpy as np
import pytest

from merger.io.splicewrite import PIPE_BYTES, SpliceRefused, SpliceWriter

pytestmark = pytest.mark.skipif(not SpliceWriter().usable, reason="no vmsplice on this platform")


def test_buffers_of_every_kind_land_exactly_in_order(tmp_path):
    rng = np.random.default_rng(0)
    big = rng.integers(0, 256, size=3 * PIPE_BYTES + 12345, dtype=np.uint8)  # not a multiple of the pipe
    src = tmp_path / "src.bin"
    src.write_bytes(rng.integers(0, 256, size=PIPE_BYTES + 77, dtype=np.uint8).tobytes())
    with open(src, "rb") as f:
        ro_map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # passthrough slices are read-only views
    parts = [b"header", big, bytearray(b"x" * 100_000), memoryview(ro_map)[5:], big[1:]]
    sw = SpliceWriter()
    out = tmp_path / "out.bin"
    with open(out, "wb", buffering=0) as f:
        f.write(parts[0])  # write() and splice share the file position
        for p in parts[1:]:
            sw.write(f.fileno(), p)
        f.write(b"tail")
    sw.close()
    expected = b"".join(bytes(memoryview(p).cast("B")) for p in parts) + b"tail"
    assert out.read_bytes() == expected
    assert sw.usable


def test_a_refusal_moves_nothing_and_the_writer_falls_back(tmp_path, monkeypatch):
    from merger.io.writer import OutTensor, StreamingShardWriter, plan_shards

    monkeypatch.setenv("SWITCHYARD_DIRECT_IO", "0")  # the page-cache path is the one under test
    path = tmp_path / "append.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)  # splice into an O_APPEND file: EINVAL
    sw = SpliceWriter()
    with pytest.raises(SpliceRefused):
        sw.write(fd, bytes(200_000))
    os.close(fd)
    assert not sw.usable and path.stat().st_size == 0

    a, b = np.arange(300_000, dtype=np.float32), np.arange(200_000, dtype=np.float32)
    (plan,) = plan_shards([OutTensor("a", "F32", a.shape), OutTensor("b", "F32", b.shape)], 1 << 30)
    writer = StreamingShardWriter(tmp_path, [plan])
    calls = []

    def refuse(fd, data):
        calls.append(len(memoryview(data).cast("B")))
        writer._splice.usable = False
        raise SpliceRefused(errno.EINVAL)

    monkeypatch.setattr(writer._splice, "write", refuse)
    writer.write("a", a)
    writer.write("b", b)
    writer.close()
    from safetensors.numpy import load_file

    got = load_file(tmp_path / plan.filename)
    assert np.array_equal(got["a"], a) and np.array_equal(got["b"], b)
    assert calls == [a.nbytes]  # tried once, then write() for good


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("SWITCHYARD_SPLICE", "0")
    assert not SpliceWriter().usable
