"""The hot path: one OpenAI completion request, forwarded to the engine its route names.

- the route is resolved once, on arrival; the request keeps it even if the table is swapped;
- the body is parsed once and re-serialized only when the model name or stream options change;
- responses are passed through as bytes (only the `"model":"..."` pair is replaced), streams event
  by event with no buffering beyond one incomplete event;
- connection refused (nothing reached the engine) is retried `connect_retries` times, nothing else is;
- a stream that breaks upstream ends with a terminal SSE error event, never a clean-looking end;
- a client that disconnects cancels the upstream request (its connection is closed, vLLM aborts).
"""

from __future__ import annotations

import asyncio
import json
import time

import anyio
import httpx
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from gateway.core.errors import (
    BodyTooLarge, UpstreamTimeout, UpstreamUnavailable, error_body, sse_error_event,
)
from gateway.core.rewrite import (
    CompletionRequest, Kind, forward_request_headers, model_renamer, parse_request, response_headers,
    upstream_body, usage_of,
)
from gateway.core.routing import Route
from gateway.core.sse import SSEFramer, process_event
from gateway.service import Gateway
from gateway.upstream import Upstream

PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


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
    timeout = httpx.Timeout(s.stream_idle_timeout_s if req.stream else s.read_timeout_s,
                            connect=s.connect_timeout_s, pool=s.connect_timeout_s)
    upstream_request = gw.client.build_request(
        "POST", up.url + PATHS[kind], content=upstream_body(req, route.upstream_model, raw),
        headers=forward_request_headers(request.headers.items()), timeout=timeout)
    gw.enter(up)
    handed_over = False
    try:
        resp = await _send_with_retry(gw, up, upstream_request)
        if req.stream and resp.status_code == 200:
            handed_over = True  # the stream response releases the slot when it ends, however it ends
            return _ProxyStream(gw, up, route, req, resp, arrived)
        return await _whole_response(gw, up, route, resp, request, arrived)
    except BaseException as exc:
        status = getattr(exc, "status", 499 if isinstance(exc, asyncio.CancelledError) else 500)
        gw.metrics.requests.labels(route.name, route.mode, str(status)).inc()
        raise
    finally:
        if not handed_over:
            gw.leave(up)


async def _send_with_retry(gw: Gateway, up: Upstream, request: httpx.Request) -> httpx.Response:
    """Retries only when nothing reached the engine (refused / no connection in time)."""
    s = gw.settings
    for attempt in range(s.connect_retries + 1):
        try:
            return await gw.client.send(request, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            if attempt == s.connect_retries:
                refused = isinstance(exc, httpx.ConnectError)
                gw.suspect(up, f"{type(exc).__name__}: {exc}", refused=refused)
                raise UpstreamUnavailable(f"the engine {up.name} is unreachable ({type(exc).__name__})",
                                          f"it may be restarting; retry in {s.retry_after_s} s", s.retry_after_s) from None
            await asyncio.sleep(s.retry_backoff_s * (2 ** attempt))
        except httpx.TimeoutException:
            raise UpstreamTimeout(f"the engine {up.name} did not answer in time", "retry, or raise the timeouts") from None
        except httpx.TransportError as exc:
            gw.suspect(up, f"{type(exc).__name__}: {exc}", refused=False)
            raise UpstreamUnavailable(f"the engine {up.name} dropped the connection", "retry shortly",
                                      s.retry_after_s) from None
    raise AssertionError("unreachable")


async def _whole_response(gw: Gateway, up: Upstream, route: Route, resp: httpx.Response,
                          request: Request, arrived: float) -> Response:
    """Read the engine's whole answer, unless the client goes away first (then abort it)."""
    s = gw.settings
    body: bytes | None = None
    failure: Exception | None = None
    try:
        async with anyio.create_task_group() as tg:
            async def read() -> None:
                nonlocal body, failure
                try:
                    body = await resp.aread()
                except httpx.HTTPError as exc:  # kept out of the task group's ExceptionGroup
                    failure = exc
                tg.cancel_scope.cancel()

            async def watch() -> None:
                await _until_disconnect(request.receive)
                tg.cancel_scope.cancel()

            tg.start_soon(read)
            tg.start_soon(watch)
    finally:
        await resp.aclose()
    if isinstance(failure, httpx.TimeoutException):
        raise UpstreamTimeout(f"the engine {up.name} did not finish within {s.read_timeout_s:g} s",
                              "ask for fewer tokens, stream, or raise SWITCHYARD_READ_TIMEOUT_S")
    if failure is not None:
        gw.suspect(up, f"{type(failure).__name__}: {failure}", refused=False)
        raise UpstreamUnavailable(f"the engine {up.name} went away mid-request", "it may be restarting; retry",
                                  s.retry_after_s)
    if body is None:  # the client disconnected: nobody to answer
        gw.metrics.requests.labels(route.name, route.mode, "499").inc()
        return Response(status_code=499)
    headers = response_headers(resp.headers.multi_items(), route.mode, up.name)
    if resp.status_code == 200:
        body = model_renamer(route.upstream_model, route.name)(body)
        gw.metrics.observe_usage(route.name, route.mode, usage_of(body))
    elif "json" not in resp.headers.get("content-type", ""):
        body = json.dumps(error_body(body.decode(errors="replace")[:2000], "upstream_error", resp.status_code)).encode()
        headers["content-type"] = "application/json"
    gw.metrics.requests.labels(route.name, route.mode, str(resp.status_code)).inc()
    gw.metrics.latency.labels(route.name, route.mode).observe(time.perf_counter() - arrived)
    return Response(body, status_code=resp.status_code, headers=headers)


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class _ProxyStream(Response):
    """Server-sent events from the engine to the client, one read at a time. Ends with the engine's
    `[DONE]`, or with a terminal error event when the engine fails, stalls or truncates."""

    def __init__(self, gw: Gateway, up: Upstream, route: Route, req: CompletionRequest,
                 resp: httpx.Response, arrived: float) -> None:
        self.gw, self.up, self.route, self.req, self.resp, self.arrived = gw, up, route, req, resp, arrived
        self.status_code = 200
        self.background = None
        headers = response_headers(resp.headers.multi_items(), route.mode, up.name)
        headers.setdefault("content-type", "text/event-stream")
        headers["cache-control"] = "no-cache"
        headers["x-accel-buffering"] = "no"
        self.init_headers(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        outcome = "499"  # unless the stream finishes, the client went away
        try:
            async with anyio.create_task_group() as tg:
                async def watch() -> None:
                    await _until_disconnect(receive)
                    tg.cancel_scope.cancel()

                tg.start_soon(watch)
                outcome = await self._pump(send)
                tg.cancel_scope.cancel()
        finally:
            await self.resp.aclose()  # closes the engine's connection: vLLM aborts the request
            self.gw.leave(self.up)
            m, r = self.gw.metrics, self.route
            m.requests.labels(r.name, r.mode, outcome).inc()
            m.latency.labels(r.name, r.mode).observe(time.perf_counter() - self.arrived)

    async def _pump(self, send: Send) -> str:
        gw, route = self.gw, self.route
        rename = model_renamer(route.upstream_model, route.name)
        strip = not self.req.client_wants_usage
        framer = SSEFramer()
        done, first = False, True
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        failure: tuple[str, str] | None = None
        try:
            async for chunk in self.resp.aiter_raw():
                out = []
                for event in framer.feed(chunk):
                    info = process_event(event, rename, strip)
                    if info.usage:
                        gw.metrics.observe_usage(route.name, route.mode, info.usage)
                    done = done or info.done
                    if info.out is not None:
                        out.append(info.out)
                if out:
                    if first:
                        first = False
                        gw.metrics.ttft.labels(route.name, route.mode).observe(time.perf_counter() - self.arrived)
                    await send({"type": "http.response.body", "body": b"".join(out), "more_body": True})
        except httpx.TimeoutException:
            failure = ("504", f"the engine {self.up.name} sent nothing for {gw.settings.stream_idle_timeout_s:g} s")
        except httpx.TransportError as exc:
            gw.suspect(self.up, f"{type(exc).__name__}: {exc}", refused=False)
            failure = ("502", f"the engine {self.up.name} failed mid-stream ({type(exc).__name__})")
        if failure is None and not done:
            gw.suspect(self.up, "stream ended without [DONE]", refused=False)
            failure = ("502", f"the engine {self.up.name} ended the stream early")
        if failure is not None:
            status, message = failure
            await send({"type": "http.response.body", "more_body": True,
                        "body": sse_error_event(message + "; the response is incomplete", "upstream_error", int(status))})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return failure[0] if failure else "200"
