"""Move bytes from memory into a file through a pipe (`vmsplice` + `splice`) instead of `write`.

Why: on the Firecracker VMs this project is built and benchmarked on, `write()` from user memory into
the page cache costs about 3.6 ns of system time per byte when the kernel takes fresh pages (2.28 GB:
8.0-8.3 s), while the same bytes moved by `vmsplice` into a pipe and `splice` from it into the file
cost 1.1-1.7 s, about what `cp` (which copies inside the kernel) costs (`benchmarks/write_paths.py`,
numbers in docs/benchmarks.md "Merge"). The kernel still copies the bytes into the page
cache during `splice`, so once a call returns the caller may reuse its buffer.

Linux only; anywhere `vmsplice` is missing or refused the writer falls back to `write()` for good.
`SWITCHYARD_SPLICE=0` turns it off.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os

PIPE_BYTES = 1 << 20  # the unprivileged maximum (/proc/sys/fs/pipe-max-size)
_F_SETPIPE_SZ = 1031


class _IOVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def _vmsplice():
    if os.environ.get("SWITCHYARD_SPLICE", "1") == "0" or not hasattr(os, "splice"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).vmsplice
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.POINTER(_IOVec), ctypes.c_size_t, ctypes.c_uint]
    fn.restype = ctypes.c_ssize_t
    return fn


class SpliceWriter:
    """Writes whole buffers to `fd` at its current position; `write` returns once every byte is in
    the file (the page cache). `usable` turns False when the kernel refuses, and callers then use
    plain `write()`; nothing is half-written by a refusal (it happens before the first byte moves)."""

    def __init__(self) -> None:
        self._fn = _vmsplice()
        self._pipe: tuple[int, int] | None = None
        self.usable = self._fn is not None

    def _pipe_fds(self) -> tuple[int, int]:
        if self._pipe is None:
            r, w = os.pipe()
            try:
                fcntl.fcntl(w, _F_SETPIPE_SZ, PIPE_BYTES)
            except OSError:
                pass  # the default 64 KiB pipe still works, in more calls
            self._pipe = (r, w)
        return self._pipe

    def write(self, fd: int, data) -> None:
        import numpy as np

        arr = np.frombuffer(data, dtype=np.uint8)  # an address for read-only buffers (maps) too
        if not arr.size:
            return
        r, w = self._pipe_fds()
        base, total, off = arr.ctypes.data, arr.size, 0
        while off < total:
            iov = _IOVec(base + off, min(PIPE_BYTES, total - off))
            n = self._fn(w, ctypes.byref(iov), 1, 0)
            if n < 0:
                err = ctypes.get_errno()
                if err == errno.EINTR:
                    continue
                if off == 0 and err in (errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.EBADF):
                    self.usable = False  # refused before anything moved: the caller writes instead
                    raise SpliceRefused(err)
                raise OSError(err, os.strerror(err))
            left = n
            while left:
                try:
                    moved = os.splice(r, fd, left)
                except OSError as exc:
                    if off == 0 and left == n and exc.errno in (errno.EINVAL, errno.ENOSYS):
                        self._drain(r, n)
                        self.usable = False
                        raise SpliceRefused(exc.errno) from exc
                    raise
                left -= moved
            off += n

    def _drain(self, r: int, n: int) -> None:
        while n:
            n -= len(os.read(r, n))

    def close(self) -> None:
        if self._pipe is not None:
            for fd in self._pipe:
                os.close(fd)
            self._pipe = None


class SpliceRefused(Exception):
    """The kernel refused vmsplice/splice before any byte reached the file."""

    def __init__(self, err: int) -> None:
        super().__init__(os.strerror(err))
