"""The gateway's HTTP server protocol: uvicorn's httptools protocol plus a direct write path for
streamed completions.

Through ASGI every SSE event costs an `await send(...)`: a task switch per upstream read and a few
wrappers. With `GatewayProtocol` (`gateway.app.server_options` selects it) each request's scope
carries a `DirectWriter` under `scope["extensions"]["switchyard.direct"]`, and the proxy writes
events to the client's transport straight from the engine connection's `data_received`. uvicorn
still owns the response: its start and its end go through `send`, so keep-alive, pipelining and
connection state stay uvicorn's. Under any other server the extension is absent and the proxy
sends through ASGI as usual.

This leans on uvicorn's httptools implementation (`cycle`, `flow`, `transport`, chunked framing);
tests/gateway/test_direct_stream.py checks it against the installed uvicorn.
"""

from __future__ import annotations

from typing import Callable

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

EXTENSION = "switchyard.direct"


class DirectWriter:
    """Body writes for one chunked response whose start went through ASGI `send`."""

    __slots__ = ("_cycle", "on_lost")

    def __init__(self, cycle) -> None:
        self._cycle = cycle
        self.on_lost: Callable[[], None] | None = None  # called once if the client disconnects

    @property
    def usable(self) -> bool:
        """True once the response has started with chunked encoding (what `write` produces)."""
        c = self._cycle
        return c.response_started and c.chunked_encoding is True and not c.response_complete

    @property
    def gone(self) -> bool:
        return self._cycle.disconnected

    @property
    def paused(self) -> bool:
        """The client's socket buffer is full: stop feeding until `drain()` returns."""
        return self._cycle.flow.write_paused

    async def drain(self) -> None:
        await self._cycle.flow.drain()

    def write(self, data: bytes) -> bool:
        """One chunk of the response body (never empty: an empty chunk would end the response).
        True when the client's socket buffer is full: stop feeding until `drain()` returns."""
        c = self._cycle
        if data and not c.disconnected:
            c.transport.write(b"%x\r\n%b\r\n" % (len(data), data))
        return c.flow.write_paused


class GatewayProtocol(HttpToolsProtocol):
    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle.scope is self.scope:  # not for an upgrade, which keeps no cycle
            writer = DirectWriter(cycle)
            self.scope.setdefault("extensions", {})[EXTENSION] = writer
            self._direct = writer

    def connection_lost(self, exc) -> None:
        super().connection_lost(exc)
        writer = getattr(self, "_direct", None)
        if writer is not None and writer.on_lost is not None:
            callback, writer.on_lost = writer.on_lost, None
            callback()
