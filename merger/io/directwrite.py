"""Write a file with O_DIRECT: bytes go from an aligned staging buffer to the device, past the page cache.

Why: on the VMs this project is built and benchmarked on, putting fresh pages into the page cache is
the expensive part of writing a checkpoint, for `write()`, for `vmsplice` + `splice` and for `cp`
alike; 2.2 GB written with `dd oflag=direct` took 1.1-1.3 s against 5.8-6.7 s buffered plus `sync`
(`benchmarks/write_paths.py` has the committed comparison, figures in docs/benchmarks.md "Merge").
A merge writes each output byte once and does not read it back, so it gains nothing from the cache.

O_DIRECT wants the buffer address, the length and the file offset aligned to the device's block size.
The staging buffer is an anonymous map (page-aligned) whose size is a multiple of `ALIGN`; every
write but the last is a full buffer, the last is padded to `ALIGN` and the file is then truncated to
its true length. Where the file system refuses O_DIRECT (tmpfs, some network file systems), at open
or at the first write, `DirectFile.open` returns None or the file carries on with plain writes:
nothing is lost, only the speed-up. `SWITCHYARD_DIRECT_IO=0` turns it off.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os

ALIGN = 4096  # covers 512-byte and 4 KiB logical blocks
STAGING_BYTES = 8 << 20  # per device write: large enough to stream, small beside the tensors in flight
ZERO_COPY_BYTES = 1 << 20  # aligned writes this large skip the staging buffer
_REFUSED = (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP)


def enabled() -> bool:
    return hasattr(os, "O_DIRECT") and os.environ.get("SWITCHYARD_DIRECT_IO", "1") != "0"


class DirectFile:
    """A new file written sequentially through O_DIRECT. `write` copies into the staging buffer and
    flushes it when full, or, for a large page-aligned buffer at an aligned file position, writes it
    in place; either way the caller may reuse its buffer once `write` returns. `close` pads,
    truncates, fsyncs."""

    def __init__(self, path: os.PathLike, fd: int) -> None:
        self.path, self.fd = path, fd
        self.size = 0  # bytes given so far: the file's final length
        self._buf = mmap.mmap(-1, STAGING_BYTES)
        self._anchor = ctypes.c_char.from_buffer(self._buf)  # an export: dropped before the map closes
        self._addr = ctypes.addressof(self._anchor)
        self._fill = 0
        self.direct = True  # False once the file system refused and plain writes took over
        self.zero_copy = True  # False once a write from the caller's memory was refused

    @classmethod
    def open(cls, path: os.PathLike) -> DirectFile | None:
        """The file created (truncated) for O_DIRECT writes, or None where O_DIRECT is off or refused."""
        if not enabled():
            return None
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        except OSError as exc:
            if exc.errno in _REFUSED:
                return None
            raise
        return cls(path, fd)

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        src = _address(view)
        off, total = 0, view.nbytes
        if total >= ZERO_COPY_BYTES and self.direct and self.zero_copy and src % ALIGN == 0 and self._fill % ALIGN == 0:
            # caller's memory is aligned and so is the file position: the device reads it in place,
            # no copy through the staging buffer (a merged tensor in a page-aligned output buffer)
            if self._fill:
                self._flush(self._fill)
            off = self._write_in_place(view[: total - total % ALIGN])
        while off < total:
            n = min(STAGING_BYTES - self._fill, total - off)
            ctypes.memmove(self._addr + self._fill, src + off, n)
            self._fill += n
            off += n
            if self._fill == STAGING_BYTES:
                self._flush(STAGING_BYTES)
        self.size += total

    def _write_in_place(self, view: memoryview) -> int:
        """Write `view` from where it lies; bytes written. A refusal (memory the kernel will not do
        direct I/O from) leaves the rest to the staging buffer, now and for later writes."""
        done = 0
        try:
            while done < view.nbytes:
                done += os.write(self.fd, view[done:])
        except OSError as exc:
            if exc.errno not in _REFUSED or done % ALIGN:
                raise
            self.zero_copy = False
        return done

    def _flush(self, length: int) -> None:
        """Write the first `length` bytes of the staging buffer (`length` a multiple of ALIGN)."""
        try:
            self._write_staged(length)
        except OSError as exc:
            if not (self.direct and exc.errno in _REFUSED and os.lseek(self.fd, 0, os.SEEK_CUR) == 0):
                raise
            self._reopen_buffered()  # refused before any byte landed: carry on without O_DIRECT
            self._write_staged(length)
        self._fill = 0

    def _write_staged(self, length: int) -> None:
        with memoryview(self._buf) as whole:
            view = whole[:length]
            while view:
                view = view[os.write(self.fd, view):]

    def _reopen_buffered(self) -> None:
        os.close(self.fd)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_TRUNC)
        self.direct = False

    def close(self) -> None:
        """Write what is staged, set the file's exact length, fsync, close."""
        try:
            if self._fill:  # padded to ALIGN with whatever the buffer holds; the truncate cuts it off
                self._flush(-(-self._fill // ALIGN) * ALIGN)
            os.ftruncate(self.fd, self.size)
            os.fsync(self.fd)
        finally:
            self.abort()

    def abort(self) -> None:
        """Close without finishing (the caller removes the partial output)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if not self._buf.closed:
            self._addr, self._anchor = 0, None
            try:
                self._buf.close()
            except BufferError:
                pass  # a view is still exported (an error mid-write): the map goes with the object


def _address(view: memoryview) -> int:
    """The address of a C-contiguous byte view, read-only buffers (memory maps) included."""
    import numpy as np

    return np.frombuffer(view, dtype=np.uint8).ctypes.data if view.nbytes else 0
