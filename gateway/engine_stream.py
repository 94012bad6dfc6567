"""Streamed completions from the engines: pooled HTTP/1.1 connections read by asyncio Protocols.

Why not aiohttp here: reading a stream through aiohttp wakes the proxy's task once per upstream read
and costs about twice the CPU of a Protocol with httptools' parser (benchmarks/stream_reader.py:
664-687 vs 278-298 µs per 16-chunk stream at 128 paced streams). Here every body piece is handed to
a sink synchronously, in `data_received`, so a stream costs no task switch per event.

    conn = await pool.connect(up)                # an idle pooled connection, or a new one
    conn.send(request_bytes, timeout_s)          # `timeout_s`: the longest silence from the engine
    status, headers = await conn.head()          # the response's status line and headers
    body = await conn.read_all()                 # ... then either the whole body (errors),
    conn.relay(sink)                             # ... or every piece to sink.body(), then sink.end(exc)
    pool.finish(conn)                            # back to the pool when complete, else closed

A connection that fails before any response byte raises `EngineGone` with `fresh` telling whether it
had been used before: a pooled connection the engine was closing is not a refused one, and only
refused connections (nothing reached the engine) may be retried.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import time
from typing import Protocol
from urllib.parse import urlsplit

import httptools


class EngineGone(ConnectionError):
    """The engine closed or reset the connection (or sent garbage)."""

    def __init__(self, message: str, before_response: bool) -> None:
        super().__init__(message)
        self.before_response = before_response


class EngineSilent(TimeoutError):
    """The engine sent nothing for the connection's timeout."""


class Sink(Protocol):
    def body(self, data: bytes) -> None: ...
    def end(self, error: BaseException | None) -> None: ...


class EngineConnection(asyncio.Protocol):
    """One keep-alive connection to an engine; one request at a time."""

    def __init__(self, key: tuple[str, int]) -> None:
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.idle_since = 0.0
        self.complete = False  # the current response was read to its end
        self.reusable = False  # ... and the engine keeps the connection open after it
        self.closed = False
        self._loop = asyncio.get_running_loop()
        self._parser = None
        self._waiter: asyncio.Future | None = None
        self._status = 0
        self._headers: list[tuple[str, str]] = []
        self._chunks: list[bytes] = []
        self._sink: Sink | None = None
        self._got_bytes = False
        self._last = 0.0
        self._timeout = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._paused = False
        self._after_complete = None  # what finish() asked for once the response ends

    # --- asyncio callbacks ------------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._last = time.monotonic()
        if self._parser is None:  # bytes while no request is out: the connection is unusable
            self._fail(EngineGone("the engine sent bytes with no request outstanding", False))
            return
        self._got_bytes = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(EngineGone(f"the engine sent a malformed response ({exc})", not self._status))

    def connection_lost(self, exc) -> None:
        self.closed = True
        self._cancel_timer()
        if self._parser is not None and not self.complete:
            why = f"{type(exc).__name__}: {exc}" if exc else "the engine closed the connection"
            self._fail(EngineGone(why, before_response=not self._got_bytes), close=False)

    # --- httptools callbacks ----------------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self._status = self._parser.get_status_code()
        self._wake((self._status, self._headers))

    def on_body(self, body: bytes) -> None:
        if self._sink is not None:
            self._sink.body(body)
        else:
            self._chunks.append(body)

    def on_message_complete(self) -> None:
        self.complete = True
        self.reusable = self._parser.should_keep_alive()
        self._parser = None
        self._cancel_timer()
        if self._sink is not None:
            sink, self._sink = self._sink, None
            sink.end(None)
        else:
            self._wake(b"".join(self._chunks))
        if self._after_complete is not None:
            callback, self._after_complete = self._after_complete, None
            callback()

    # --- the request ------------------------------------------------------------------------------
    def send(self, request: bytes, timeout_s: float) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self.complete = self.reusable = self._got_bytes = False
        self._status, self._headers, self._chunks, self._sink = 0, [], [], None
        self._timeout = timeout_s
        self._last = time.monotonic()
        self._timer = self._loop.call_later(timeout_s, self._check_silence)
        self.transport.write(request)

    async def head(self) -> tuple[int, list[tuple[str, str]]]:
        if self._status:
            return self._status, self._headers
        return await self._wait()

    async def read_all(self) -> bytes:
        if self.complete:
            return b"".join(self._chunks)
        return await self._wait()

    def relay(self, sink: Sink) -> None:
        """Every body piece from now on goes to `sink.body`, in data_received; then one `sink.end`."""
        pending, self._chunks = b"".join(self._chunks), []
        if pending:
            sink.body(pending)
        if self.complete:
            sink.end(None)
        else:
            self._sink = sink

    def pause(self) -> None:
        """Stop reading (the client is slow); the silence timeout waits too."""
        if not self._paused and not self.closed:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and not self.closed:
            self._paused = False
            self._last = time.monotonic()
            self.transport.resume_reading()

    def when_complete(self, callback) -> None:
        """The caller is done with the response: ignore the rest of its body, call `callback` once
        the response has ended (never if the connection closes first)."""
        self._sink = None
        self._after_complete = callback

    def close(self) -> None:
        """Drop the connection (an engine aborts a request whose connection closes)."""
        self._sink = None
        self._after_complete = None
        self._cancel_timer()
        if not self.closed:
            self.closed = True
            self.transport.close()

    # --- internals --------------------------------------------------------------------------------
    async def _wait(self):
        self._waiter = self._loop.create_future()
        try:
            return await self._waiter
        finally:
            self._waiter = None

    def _wake(self, value) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(value)

    def _fail(self, exc: BaseException, close: bool = True) -> None:
        self._parser = None
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)
        if self._sink is not None:
            sink, self._sink = self._sink, None
            sink.end(exc)
        if close:
            self.close()

    def _check_silence(self) -> None:
        self._timer = None
        if self._parser is None or self.closed:
            return
        quiet = time.monotonic() - self._last
        if self._paused or quiet < self._timeout:  # re-arm for the rest of the interval
            self._timer = self._loop.call_later(max(self._timeout - quiet, 0.01), self._check_silence)
            return
        self._fail(EngineSilent(f"nothing from the engine for {self._timeout:g} s"))

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class EnginePool:
    """Idle keep-alive connections per engine, dropped after `idle_s` (below the engine's own
    keep-alive: sending on a connection the engine is closing fails the request)."""

    def __init__(self, idle_s: float, connect_timeout_s: float, drain_s: float = 2.0) -> None:
        self.idle_s, self.connect_timeout_s, self.drain_s = idle_s, connect_timeout_s, drain_s
        self._idle: dict[tuple[str, int], collections.deque[EngineConnection]] = {}
        self.opened = 0  # connections opened so far (for tests and metrics)

    @staticmethod
    @functools.lru_cache(maxsize=256)  # called per request with a handful of engine URLs
    def key_of(url: str) -> tuple[str, int]:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"engine URL {url!r}: only http://host:port is supported")
        return parts.hostname, parts.port or 80

    async def connect(self, url: str) -> EngineConnection:
        """An idle pooled connection (most recently used first), or a new one. Raises OSError
        (refused, unreachable) or EngineSilent (connect timeout): nothing reached the engine."""
        key = self.key_of(url)
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < self.idle_s:
                return conn
            conn.close()
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: EngineConnection(key), key[0], key[1]), self.connect_timeout_s)
        except asyncio.TimeoutError:
            raise EngineSilent(f"no connection to the engine within {self.connect_timeout_s:g} s") from None
        self.opened += 1
        return conn

    def finish(self, conn: EngineConnection, ok: bool = True) -> None:
        """Done with `conn`: pooled if its response is complete and the engine keeps it, left to
        finish for at most `drain_s` when only the end of the body is missing (`ok`), else closed."""
        if conn.closed:
            return
        if conn.complete:
            self._put(conn) if ok and conn.reusable else conn.close()
            return
        if not ok:
            conn.close()
            return
        timer = asyncio.get_running_loop().call_later(self.drain_s, conn.close)

        def completed() -> None:
            timer.cancel()
            self._put(conn) if conn.reusable else conn.close()

        conn.when_complete(completed)

    def _put(self, conn: EngineConnection) -> None:
        conn.idle_since = time.monotonic()
        self._idle.setdefault(conn.key, collections.deque()).append(conn)
        self._prune(conn.key, conn.idle_since)

    def _prune(self, key, now: float) -> None:
        idle = self._idle[key]
        while idle and (idle[0].closed or now - idle[0].idle_since >= self.idle_s):
            idle.popleft().close()

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()


def request_bytes(method: str, url: str, path: str, headers: dict[str, str], body: bytes) -> bytes:
    """An HTTP/1.1 request with a Content-Length body (header values came through a parser: no CR/LF)."""
    host, port = EnginePool.key_of(url)
    lines = [f"{method} {path} HTTP/1.1", f"host: {host}:{port}", f"content-length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
