"""Fast fixtures: a canned upstream (fixed SSE chunks) and gateways served by uvicorn in a thread.
The canned upstream only isolates the proxy; the engine tests (test_engine.py) use real vLLM."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import pytest

from deploy.engines import free_port
from gateway.app import create_app
from gateway.canned import CannedUpstream, ServerThread
from gateway.core.routing import Route
from gateway.server import DirectWriter, GatewayProtocol
from gateway.service import Gateway
from gateway.settings import load_settings

CLIENT_KEY, ADMIN_KEY = "client-key-1", "admin-key-1"


@pytest.fixture(scope="module")
def canned() -> CannedUpstream:
    up = CannedUpstream()
    with ServerThread(up, free_port(), log_level="critical") as server:
        up.url = server.url
        yield up


@pytest.fixture()
def fresh_canned(canned: CannedUpstream) -> CannedUpstream:
    canned.records.clear()
    canned.aborted = canned.completed = 0
    canned.loaded.clear()
    return canned


@contextmanager
def serve_gateway(upstream_url: str, routes=None, base_model: Path | None = None, http=GatewayProtocol,
                  **settings):
    """A gateway in a thread with one upstream "base" and the given routes (default: stable -> lora-x).
    `http="httptools"` serves it as plain uvicorn would: streams then go through ASGI sends."""
    base = dict(api_keys=CLIENT_KEY, admin_key=ADMIN_KEY, health_interval_s=0.5, down_probe_interval_s=0.2,
                probe_timeout_s=2, retry_backoff_s=0.01, stream_idle_timeout_s=5, read_timeout_s=5)
    base.update(settings)
    s = load_settings(**base)
    gw = Gateway(s)
    gw.add_upstream("base", upstream_url, probe_model="canned-base", max_lora_rank=8,
                    base_model=base_model)
    for r in routes or [Route("stable", "base", "lora-x", "adapter"), Route("canned-base", "base", "canned-base", "base")]:
        gw.set_route(r)
    with ServerThread(create_app(s, gw), free_port(), timeout_keep_alive=s.client_keepalive_s,
                      http=http) as server:
        server.gateway = gw
        yield server


@pytest.fixture()
def gateway_url(fresh_canned):
    with serve_gateway(fresh_canned.url) as server:
        yield server


@pytest.fixture(params=["direct", "asgi"])
def stream_gateway(request, fresh_canned, monkeypatch):
    """A gateway served both ways streams can leave it: written straight to the client's transport
    (GatewayProtocol, as `switchyard gateway` serves) and through ASGI sends (any other server).
    `server.direct_writes` counts the direct writes, so a test can tell which path ran."""
    writes = [0]
    original = DirectWriter.write

    def counting(self, data: bytes) -> bool:
        writes[0] += 1
        return original(self, data)

    monkeypatch.setattr(DirectWriter, "write", counting)
    http = GatewayProtocol if request.param == "direct" else "httptools"
    with serve_gateway(fresh_canned.url, http=http) as server:
        server.path = request.param
        server.direct_writes = lambda: writes[0]
        yield server


def auth(key: str = CLIENT_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}
