"""SHA-256 contexts that C code can update: OpenSSL's EVP digests in libcrypto, through ctypes.

Why: the ordered merge pass (merger/ordered.py) hashes each chunk of output from the merge worker
that computed it, inside merger/native's `hash_in_turn`, with no Python between one worker's chunk
and the next's; a hashlib object cannot be handed to C. libcrypto is the library hashlib itself uses
on CPython builds with OpenSSL, so the digests are the same (checked against hashlib when loaded).
Where it cannot be loaded, `load()` returns None and the merge hashes with hashlib as before.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import threading
from typing import Optional

last_error: Optional[str] = None  # why libcrypto is unavailable, for the curious (and the tests)
_lock = threading.Lock()
_loaded: dict[str, Optional["Sha256Lib"]] = {}


class Context:
    """One running SHA-256; `address` is what C passes to `EVP_DigestUpdate`."""

    def __init__(self, lib: "Sha256Lib") -> None:
        self._lib = lib
        self.address = lib.new_ctx()
        if not self.address or lib.init(self.address, lib.sha256(), None) != 1:
            raise OSError("EVP_DigestInit_ex failed")

    def update(self, data: bytes) -> None:
        if self._lib.update(self.address, data, len(data)) != 1:
            raise OSError("EVP_DigestUpdate failed")

    def hexdigest(self) -> str:
        """The digest (once: the context is freed)."""
        md, n = ctypes.create_string_buffer(64), ctypes.c_uint(0)
        try:
            if self._lib.final(self.address, md, ctypes.byref(n)) != 1:
                raise OSError("EVP_DigestFinal_ex failed")
            return md.raw[: n.value].hex()
        finally:
            self.free()

    def free(self) -> None:
        if self.address:
            self._lib.free_ctx(self.address)
            self.address = None

    def __del__(self) -> None:
        self.free()


class Sha256Lib:
    def __init__(self, lib: ctypes.CDLL) -> None:
        self.new_ctx = lib.EVP_MD_CTX_new
        self.new_ctx.restype, self.new_ctx.argtypes = ctypes.c_void_p, []
        self.free_ctx = lib.EVP_MD_CTX_free
        self.free_ctx.restype, self.free_ctx.argtypes = None, [ctypes.c_void_p]
        self.sha256 = lib.EVP_sha256
        self.sha256.restype, self.sha256.argtypes = ctypes.c_void_p, []
        self.init = lib.EVP_DigestInit_ex
        self.init.restype, self.init.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        self.update = lib.EVP_DigestUpdate
        self.update.restype, self.update.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
        self.final = lib.EVP_DigestFinal_ex
        self.final.restype, self.final.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
        # int EVP_DigestUpdate(EVP_MD_CTX *, const void *, size_t): what merger/native's hash_in_turn calls
        self.update_address = ctypes.cast(lib.EVP_DigestUpdate, ctypes.c_void_p).value

    def new(self, prefix: bytes = b"") -> Context:
        ctx = Context(self)
        if prefix:
            ctx.update(prefix)
        return ctx


def load() -> Optional[Sha256Lib]:
    """libcrypto's SHA-256, or None (`last_error` says why)."""
    global last_error
    with _lock:
        if "" not in _loaded:
            lib = None
            try:
                name = ctypes.util.find_library("crypto")
                if name is None:
                    raise OSError("libcrypto not found")
                lib = Sha256Lib(ctypes.CDLL(name))
                probe = b"switchyard" * 1000
                ctx = lib.new(probe[:7])
                ctx.update(probe[7:])
                if ctx.hexdigest() != hashlib.sha256(probe).hexdigest():
                    raise OSError(f"{name}'s SHA-256 disagrees with hashlib's")
            except (OSError, AttributeError) as exc:
                last_error, lib = str(exc), None
            _loaded[""] = lib
        return _loaded[""]
