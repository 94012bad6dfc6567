"""The hot path: one OpenAI completion request, forwarded to the engine its route names.

- the route is resolved once, on arrival; the request keeps it even if the table is swapped;
- the body is parsed once and re-serialized only when the model name or stream options change;
- responses are passed through as bytes (only the `"model":"..."` pair is replaced), streams event
  by event with no buffering beyond one incomplete event;
- connection refused (nothing reached the engine) is retried `connect_retries` times, nothing else is;
- every upstream call has a connect timeout and a read timeout (streams: the longest gap between chunks);
- a stream that breaks upstream ends with a terminal SSE error event, never a clean-looking end;
- a client that disconnects cancels the upstream request (its connection is closed, vLLM aborts).

Plain requests go through aiohttp (measured about 4x less CPU per request than httpx here); streams
through gateway.engine_stream's Protocols, written to the client as they are read (gateway.server).
"""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from gateway.core.errors import BodyTooLarge, UpstreamTimeout, UpstreamUnavailable, error_body, sse_error_event
from gateway.core.rewrite import (
    CompletionRequest, Kind, forward_request_headers, model_renamer, parse_request, response_headers,
    upstream_body, usage_of,
)
from gateway.core.routing import Route
from gateway.core.sse import SSEFramer, plain_events, process_event
from gateway.engine_stream import EngineConnection, EngineGone, EngineSilent, request_bytes
from gateway.server import EXTENSION
from gateway.service import Gateway
from gateway.upstream import Upstream

PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
_TIMEOUTS = (asyncio.TimeoutError, TimeoutError)  # aiohttp's read timeouts derive from these


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"the request body is {declared} bytes, over the {limit}-byte limit", "send a smaller request")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BodyTooLarge(f"the request body is over the {limit}-byte limit", "send a smaller request")
    return bytes(body)


async def handle_completion(gw: Gateway, request: Request, kind: Kind) -> Response:
    arrived = time.perf_counter()
    raw = await read_body(request, gw.settings.max_body_bytes)
    req = parse_request(raw, kind)
    route = gw.table.resolve(req.model)  # once: a table swap from now on does not move this request
    up = gw.available(route)
    s = gw.settings
    body = upstream_body(req, route.upstream_model, raw)
    headers = forward_request_headers(request.headers.items())
    url = up.url + PATHS[kind]
    gw.enter(up)
    handed_over = False
    try:
        if not req.stream:
            # vLLM answers a plain request only when it is done: watch the client for the whole wait
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=s.connect_timeout_s, sock_read=s.read_timeout_s)
            whole = await _unless_disconnected(request.receive, _fetch_whole(gw, up, url, body, headers, timeout))
            if whole is None:
                gw.metrics.route(route.name, route.mode).count("499")
                return Response(status_code=499)  # nobody is listening; the engine's request was dropped
            return _answer_whole(gw, up, route, *whole, arrived)
        conn, status, upstream_headers = await _open_stream(gw, up, PATHS[kind], body, headers)
        if status == 200:
            handed_over = True  # the stream response releases the slot when it ends, however it ends
            return _ProxyStream(gw, up, route, req, conn, upstream_headers, arrived)
        return _answer_whole(gw, up, route, status, upstream_headers, await _stream_error_body(gw, up, conn),
                             arrived)
    except BaseException as exc:
        status = getattr(exc, "status", 499 if isinstance(exc, asyncio.CancelledError) else 500)
        gw.metrics.route(route.name, route.mode).count(str(status))
        raise
    finally:
        if not handed_over:
            gw.leave(up)


async def _send_with_retry(gw: Gateway, up: Upstream, url: str, body: bytes, headers: dict,
                           timeout: aiohttp.ClientTimeout) -> aiohttp.ClientResponse:
    """The engine's response once its headers arrived. Retries only when nothing reached the engine."""
    s = gw.settings
    for attempt in range(s.connect_retries + 1):
        try:
            return await gw.client.post(url, data=body, headers=headers, timeout=timeout)
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            if attempt == s.connect_retries:
                gw.suspect(up, f"{type(exc).__name__}: {exc}", refused=isinstance(exc, aiohttp.ClientConnectorError))
                raise UpstreamUnavailable(f"the engine {up.name} is unreachable ({type(exc).__name__})",
                                          f"it may be restarting; retry in {s.retry_after_s} s", s.retry_after_s) from None
            await asyncio.sleep(s.retry_backoff_s * (2 ** attempt))
        except _TIMEOUTS:
            raise UpstreamTimeout(f"the engine {up.name} did not answer within {timeout.sock_read:g} s",
                                  "retry, ask for fewer tokens, or raise the read timeout") from None
        except aiohttp.ClientError as exc:
            gw.suspect(up, f"{type(exc).__name__}: {exc}", refused=False)
            raise UpstreamUnavailable(f"the engine {up.name} dropped the connection", "it may be restarting; retry",
                                      s.retry_after_s) from None
    raise AssertionError("unreachable")


async def _open_stream(gw: Gateway, up: Upstream, path: str, body: bytes,
                       headers: dict) -> tuple[EngineConnection, int, list]:
    """A streamed request sent on a pooled engine connection, once the response's headers arrived.
    Retries only when nothing reached the engine (refused, unreachable, no connection in time)."""
    s = gw.settings
    for attempt in range(s.connect_retries + 1):
        try:
            conn = await gw.engines.connect(up.url)
            break
        except OSError as exc:  # EngineSilent (a connect timeout) is an OSError too
            if attempt == s.connect_retries:
                gw.suspect(up, f"{type(exc).__name__}: {exc}", refused=not isinstance(exc, EngineSilent))
                raise UpstreamUnavailable(f"the engine {up.name} is unreachable ({type(exc).__name__})",
                                          f"it may be restarting; retry in {s.retry_after_s} s", s.retry_after_s) from None
            await asyncio.sleep(s.retry_backoff_s * (2 ** attempt))
    try:
        conn.send(request_bytes("POST", up.url, path, headers, body), s.stream_idle_timeout_s)
        status, upstream_headers = await conn.head()
    except EngineSilent:
        conn.close()
        raise UpstreamTimeout(f"the engine {up.name} did not answer within {s.stream_idle_timeout_s:g} s",
                              "retry, or raise SWITCHYARD_STREAM_IDLE_TIMEOUT_S") from None
    except EngineGone as exc:
        gw.suspect(up, f"{type(exc).__name__}: {exc}", refused=False)
        raise UpstreamUnavailable(f"the engine {up.name} dropped the connection", "it may be restarting; retry",
                                  s.retry_after_s) from None
    except BaseException:
        conn.close()  # cancelled while waiting: the engine aborts when its connection closes
        raise
    return conn, status, upstream_headers


async def _stream_error_body(gw: Gateway, up: Upstream, conn: EngineConnection) -> bytes:
    """The body of an engine's error answer to a streamed request."""
    s = gw.settings
    try:
        body = await conn.read_all()
    except EngineSilent:
        raise UpstreamTimeout(f"the engine {up.name} did not finish its error answer within "
                              f"{s.stream_idle_timeout_s:g} s", "retry") from None
    except EngineGone as exc:
        gw.suspect(up, f"{type(exc).__name__}: {exc}", refused=False)
        raise UpstreamUnavailable(f"the engine {up.name} went away mid-request", "it may be restarting; retry",
                                  s.retry_after_s) from None
    finally:
        gw.engines.finish(conn, ok=conn.complete)
    return body


async def _unless_disconnected(receive: Receive, work):
    """`await work`, unless the client disconnects first: then cancel it (aiohttp closes the
    engine's connection, so vLLM aborts the request) and return None."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_until_disconnect(receive))
    try:
        await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    return None if task.cancelled() else task.result()


async def _fetch_whole(gw: Gateway, up: Upstream, url: str, body: bytes, headers: dict,
                       timeout: aiohttp.ClientTimeout) -> tuple[int, list, bytes]:
    return await _read_whole(gw, up, await _send_with_retry(gw, up, url, body, headers, timeout))


async def _read_whole(gw: Gateway, up: Upstream, resp: aiohttp.ClientResponse) -> tuple[int, list, bytes]:
    """(status, headers, body) of a response read to the end."""
    s = gw.settings
    try:
        body = await resp.read()
    except _TIMEOUTS:
        raise UpstreamTimeout(f"the engine {up.name} did not finish within {s.read_timeout_s:g} s",
                              "ask for fewer tokens, stream, or raise SWITCHYARD_READ_TIMEOUT_S") from None
    except aiohttp.ClientError as exc:
        gw.suspect(up, f"{type(exc).__name__}: {exc}", refused=False)
        raise UpstreamUnavailable(f"the engine {up.name} went away mid-request", "it may be restarting; retry",
                                  s.retry_after_s) from None
    finally:
        resp.release()  # back to the pool when read to the end; closed otherwise
    return resp.status, list(resp.headers.items()), body


def _answer_whole(gw: Gateway, up: Upstream, route: Route, status: int, upstream_headers: list, body: bytes,
                  arrived: float) -> Response:
    metrics = gw.metrics.route(route.name, route.mode)
    headers = response_headers(upstream_headers, route.mode, up.name)
    if status == 200:
        body = model_renamer(route.upstream_model, route.name)(body)
        metrics.usage(usage_of(body))
    elif "json" not in dict((k.lower(), v) for k, v in upstream_headers).get("content-type", ""):
        body = json.dumps(error_body(body.decode(errors="replace")[:2000], "upstream_error", status)).encode()
        headers["content-type"] = "application/json"
    metrics.count(str(status))
    metrics.latency.observe(time.perf_counter() - arrived)
    return Response(body, status_code=status, headers=headers)


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class _ProxyStream(Response):
    """Server-sent events from the engine to the client, as the engine connection reads them. Ends
    with the engine's `[DONE]`, or with a terminal error event when the engine fails, stalls or
    truncates. Written straight to the client's transport under `gateway.server.GatewayProtocol`,
    through ASGI sends under any other server."""

    def __init__(self, gw: Gateway, up: Upstream, route: Route, req: CompletionRequest,
                 conn: EngineConnection, upstream_headers: list, arrived: float) -> None:
        self.gw, self.up, self.route, self.req, self.conn, self.arrived = gw, up, route, req, conn, arrived
        self.status_code = 200
        self.background = None
        headers = response_headers(upstream_headers, route.mode, up.name)
        headers.setdefault("content-type", "text/event-stream")
        headers["cache-control"] = "no-cache"
        headers["x-accel-buffering"] = "no"
        self.init_headers(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gw, up, route, conn = self.gw, self.up, self.route, self.conn
        metrics = gw.metrics.route(route.name, route.mode)
        outcome = "499"
        relay: _Relay | None = None
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            direct = scope.get("extensions", {}).get(EXTENSION)
            out = _DirectOut(direct) if direct is not None and direct.usable else _AsgiOut()
            relay = _Relay(gw, up, route, self.req, conn, out, metrics, self.arrived)
            if isinstance(out, _DirectOut):
                direct.on_lost = relay.client_gone
                if direct.gone:
                    relay.client_gone()
                conn.relay(relay)
                tail, failure = await relay.finished
            else:
                conn.relay(relay)
                tail, failure = await out.pump(relay, receive, send)
            if relay.gone:
                return
            if failure is not None:
                status, message = failure
                tail += sse_error_event(message + "; the response is incomplete", "upstream_error", status)
            await send({"type": "http.response.body", "body": tail, "more_body": False})
            outcome = str(failure[0]) if failure else "200"
        finally:
            if relay is not None:
                relay.out.finished()  # a pending resume-after-drain task is not needed any more
                if isinstance(relay.out, _DirectOut):
                    relay.out.direct.on_lost = None
            gw.engines.finish(conn, ok=outcome == "200")
            gw.leave(up)
            metrics.count(outcome)
            metrics.latency.observe(time.perf_counter() - self.arrived)


class _Relay:
    """The engine connection's sink: frames the SSE bytes, renames the model, strips usage the
    client did not ask for, writes the events out; `finished` resolves to (last bytes, failure)."""

    def __init__(self, gw: Gateway, up: Upstream, route: Route, req: CompletionRequest,
                 conn: EngineConnection, out, metrics, arrived: float) -> None:
        self.gw, self.up, self.conn, self.out, self.metrics, self.arrived = gw, up, conn, out, metrics, arrived
        self.rename = model_renamer(route.upstream_model, route.name)
        self.strip = not req.client_wants_usage
        self.framer = SSEFramer()
        self.done = self.gone = False
        self.first = True
        self.finished: asyncio.Future = asyncio.get_running_loop().create_future()

    def body(self, data: bytes) -> None:
        if self.finished.done():
            return
        chunk = None if self.framer.pending() else plain_events(data, self.rename)
        if chunk is None:
            out = []
            for event in self.framer.feed(data):
                info = process_event(event, self.rename, self.strip)
                if info.usage:
                    self.metrics.usage(info.usage)
                self.done = self.done or info.done
                if info.out is not None:
                    out.append(info.out)
            if not out:
                return
            chunk = b"".join(out)
            if self.done and not self.framer.pending():  # [DONE]: the response ends with these bytes, in one write
                self._first_out()
                self._finish(chunk, None)
                return
        if self.first:
            self._first_out()
        if self.out.write(chunk):  # the client is not keeping up: stop reading the engine until it does
            self.conn.pause()
            self.out.when_writable(self.conn.resume)

    def _first_out(self) -> None:
        if self.first:
            self.first = False
            self.metrics.ttft.observe(time.perf_counter() - self.arrived)

    def end(self, error: BaseException | None) -> None:
        up, s = self.up, self.gw.settings
        if self.gone or self.finished.done():
            return
        if isinstance(error, EngineSilent):
            failure = (504, f"the engine {up.name} sent nothing for {s.stream_idle_timeout_s:g} s")
        elif error is not None:
            self.gw.suspect(up, f"{type(error).__name__}: {error}", refused=False)
            failure = (502, f"the engine {up.name} failed mid-stream ({type(error).__name__})")
        elif not self.done:
            self.gw.suspect(up, "stream ended without [DONE]", refused=False)
            failure = (502, f"the engine {up.name} ended the stream early")
        else:
            failure = None
        self._finish(b"", failure)

    def client_gone(self) -> None:
        """The client left: drop the engine's connection (vLLM aborts the request)."""
        if not self.finished.done():
            self.gone = True
            self.conn.close()
            self._finish(b"", None)

    def _finish(self, tail: bytes, failure) -> None:
        if not self.finished.done():
            self.finished.set_result((tail, failure))
            self.out.finished()


class _DirectOut:
    """Events written to the client's transport as they arrive (gateway.server.DirectWriter)."""

    def __init__(self, direct) -> None:
        self.direct = direct
        self.write = direct.write  # (chunk) -> True when the client's buffer is full; bound once: per event
        self._resuming: asyncio.Task | None = None

    def when_writable(self, callback) -> None:
        async def wait() -> None:
            await self.direct.drain()
            callback()

        if self._resuming is None or self._resuming.done():
            self._resuming = asyncio.ensure_future(wait())

    def finished(self) -> None:
        if self._resuming is not None:
            self._resuming.cancel()


class _AsgiOut:
    """Events buffered for the response's task, which sends them through ASGI (any server)."""

    LIMIT = 256 * 1024  # buffered bytes before the engine connection is paused

    def __init__(self) -> None:
        self.buf: list[bytes] = []
        self.size = 0
        self.wake = asyncio.Event()
        self._resume = None

    def write(self, chunk: bytes) -> bool:
        self.buf.append(chunk)
        self.size += len(chunk)
        self.wake.set()
        return self.size > self.LIMIT

    def when_writable(self, callback) -> None:
        self._resume = callback

    def finished(self) -> None:
        self.wake.set()

    async def pump(self, relay: _Relay, receive: Receive, send: Send) -> tuple[bytes, tuple | None]:
        async def watch() -> None:
            await _until_disconnect(receive)  # also returns once the response is complete
            relay.client_gone()

        watcher = asyncio.ensure_future(watch())
        try:
            while True:
                await self.wake.wait()
                self.wake.clear()
                if relay.finished.done():
                    tail, failure = relay.finished.result()
                    return b"".join(self.buf) + tail, failure
                data, self.buf, self.size = b"".join(self.buf), [], 0
                if data:
                    await send({"type": "http.response.body", "body": data, "more_body": True})
                if self._resume is not None:
                    resume, self._resume = self._resume, None
                    resume()
        finally:
            watcher.cancel()
