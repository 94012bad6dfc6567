"""`create_app`: the FastAPI app in front of the engines. No singletons: the app holds one `Gateway`
(`app.state.gateway`), started and closed by the lifespan handler.

    GET  /v1/models                      stable names, each with "mode" and "upstream"
    POST /v1/chat/completions            proxied (see gateway.proxy)
    POST /v1/completions                 proxied
    GET  /healthz  /readyz  /metrics     process alive / every route generates / Prometheus
    /admin/...                           gateway.admin (admin key), plus any `extra_routers`

Nothing else reaches an engine: vLLM's control endpoints (/pause, /v1/load_lora_adapter, ...) are
simply not routes here. Every error leaves as an OpenAI-style body, formatted in one place below.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import Iterable

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from gateway import admin
from gateway.core.auth import check_client
from gateway.core.errors import BodyTooLarge, GatewayError, error_body
from gateway.metrics import CONTENT_TYPE
from gateway.proxy import handle_completion
from gateway.server import GatewayProtocol
from gateway.service import Gateway
from gateway.settings import GatewaySettings

log = logging.getLogger("switchyard.gateway")

_MESSAGE = {"type": "object", "required": ["role"], "properties": {
    "role": {"type": "string", "enum": ["system", "user", "assistant", "tool", "developer"]},
    "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}, {"type": "null"}]},
}}
_COMMON = {
    "model": {"type": "string", "minLength": 1},
    "stream": {"type": "boolean"},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
    "max_tokens": {"type": "integer", "minimum": 1},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "n": {"type": "integer", "minimum": 1},
}
_CHAT_SCHEMA = {"type": "object", "required": ["model", "messages"],
                "properties": {**_COMMON, "messages": {"type": "array", "minItems": 1, "items": _MESSAGE}}}
_COMPLETION_SCHEMA = {"type": "object", "required": ["model", "prompt"],
                      "properties": {**_COMMON, "prompt": {"anyOf": [{"type": "string"},
                                                                     {"type": "array", "items": {"type": "string"}}]}}}


def _body_doc(schema: dict) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _error_response(status: int, message: str, type_: str, code, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, code), status_code=status, headers=headers)


class _HotPaths:
    """The two proxied POST endpoints, served ahead of FastAPI's routing and dependency machinery
    (measured: a sixth of the gateway's CPU per streamed request). Their FastAPI routes stay, for
    the OpenAPI schema and for other methods. Errors other than GatewayError reach the app's
    outermost handler (the JSON 500 below)."""

    PATHS = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}

    def __init__(self, app, gateway: Gateway, settings: GatewaySettings) -> None:
        self.app, self.gw, self.keys = app, gateway, settings.client_keys()
        self.limit = settings.max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        kind = self.PATHS.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if kind is None:
            if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH", "DELETE"):
                # FastAPI reads a body before any auth dependency runs: cap it first
                try:
                    receive = await self._buffered(receive)
                except BodyTooLarge as exc:
                    return await JSONResponse(exc.body(), status_code=exc.status)(scope, receive, send)
                except ClientDisconnect:
                    return
            return await self.app(scope, receive, send)
        request = Request(scope, receive, send)
        try:
            check_client(request.headers.get("authorization"), self.keys)
            response = await handle_completion(self.gw, request, kind)
        except GatewayError as exc:
            response = JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())
        except ClientDisconnect:
            return  # gone while sending its body: nothing reached an engine, nobody to answer
        await response(scope, receive, send)

    async def _buffered(self, receive):
        """The whole body (at most `limit` bytes), replayed to the app as one message."""
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnect()
            body += message.get("body", b"")
            if len(body) > self.limit:
                raise BodyTooLarge(f"the request body is over the {self.limit}-byte limit", "send a smaller request")
            if not message.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        return replay


def create_app(settings: GatewaySettings, gateway: Gateway | None = None,
               extra_routers: Iterable[APIRouter] = ()) -> FastAPI:
    """The app for one deployment. `gateway` defaults to an empty one built from `settings`;
    `extra_routers` (e.g. deploy's promotion routes) are mounted as given; protect them with
    `Depends(gateway.auth.require_admin)`."""
    gw = gateway or Gateway(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await gw.start()
        try:
            yield
        finally:
            await gw.close()

    app = FastAPI(title="switchyard gateway", version="0.1.0", lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.gateway = gw

    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        return _error_response(400, f"{where}: {first.get('msg')}", "invalid_request_error", "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return _error_response(exc.status_code, message, "invalid_request_error", exc.status_code,
                               getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return _error_response(500, "internal gateway error", "internal_error", "internal_error")

    # served by _HotPaths; declared here for the schema (and as the fallback if that is removed)
    @app.post("/v1/chat/completions", openapi_extra=_body_doc(_CHAT_SCHEMA), tags=["openai"])
    async def chat_completions(request: Request) -> Response:
        check_client(request.headers.get("authorization"), settings.client_keys())
        return await handle_completion(gw, request, "chat")

    @app.post("/v1/completions", openapi_extra=_body_doc(_COMPLETION_SCHEMA), tags=["openai"])
    async def completions(request: Request) -> Response:
        check_client(request.headers.get("authorization"), settings.client_keys())
        return await handle_completion(gw, request, "completions")

    app.add_middleware(_HotPaths, gateway=gw, settings=settings)

    @app.get("/v1/models", tags=["openai"])
    async def models(request: Request) -> dict:
        check_client(request.headers.get("authorization"), settings.client_keys())
        return {"object": "list", "data": [
            {"id": r.name, "object": "model", "created": gw.created, "owned_by": "switchyard",
             "mode": r.mode, "upstream": r.upstream} for r in gw.table]}

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"])
    async def readyz() -> JSONResponse:
        """Ready when every route's upstream last generated a token."""
        down = []
        for r in gw.table:
            up = next((u for u in gw.upstreams() if u.name == r.upstream), None)
            if up is None or up.state != "healthy":
                down.append({"route": r.name, "upstream": r.upstream,
                             "state": up.state if up else "unregistered",
                             "error": up.last_error if up else None})
        if down or not len(gw.table):
            names = ", ".join(d["route"] for d in down) or "(no routes)"
            body = {"ready": False, "down": down,
                    **error_body(f"not ready: no healthy engine for {names}", "upstream_unavailable", "not_ready")}
            return JSONResponse(body, status_code=503, headers={"Retry-After": str(settings.retry_after_s)})
        return JSONResponse({"ready": True, "routes": len(gw.table)})

    @app.get("/metrics", tags=["ops"])
    async def metrics() -> Response:
        return Response(gw.metrics.render(), media_type=CONTENT_TYPE)

    app.include_router(admin.router)
    for router in extra_routers:
        app.include_router(router)
    return app


def server_options(settings: GatewaySettings, graceful_shutdown_s: float | None = 30) -> dict:
    """uvicorn's options for the gateway (`switchyard gateway` and `switchyard serve`): uvloop,
    httptools with the direct write path for streams (gateway.server), and idle client connections
    kept open longer than clients keep theirs, so a client never sends on a connection the gateway
    is closing."""
    http = GatewayProtocol if settings.direct_streams else "httptools"
    return dict(host=settings.host, port=settings.port, loop="uvloop", http=http, access_log=False,
                log_level="warning", timeout_keep_alive=settings.client_keepalive_s,
                timeout_graceful_shutdown=int(graceful_shutdown_s or 0) or None)
