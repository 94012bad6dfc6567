"""The proxy against a canned upstream (fixed SSE chunks, no engine): streaming, rewriting, errors,
disconnects, route switches. The same behaviour against real vLLM is in test_engine.py."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest

from deploy.engines import free_port
from gateway.server import GatewayProtocol
from tests.gateway.conftest import ADMIN_KEY, CLIENT_KEY, auth, serve_gateway

CHAT = {"model": "stable", "messages": [{"role": "user", "content": "hi"}]}


def client(server, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=20, **kw)


def events_of(text: str) -> list[str]:
    return [e[len("data: "):] for e in text.split("\n\n") if e.startswith("data: ")]


def test_models_lists_every_route_with_mode_and_upstream(gateway_url):
    models = client(gateway_url).models.list().data
    assert [(m.id, m.mode, m.upstream) for m in models] == [("stable", "adapter", "base"), ("canned-base", "base", "base")]


def test_model_is_rewritten_both_ways_and_headers_name_mode_and_upstream(gateway_url, fresh_canned):
    r = httpx.post(gateway_url.url + "/v1/chat/completions", json=CHAT, headers=auth())
    assert r.status_code == 200 and r.json()["model"] == "stable"
    assert r.headers["x-switchyard-mode"] == "adapter" and r.headers["x-switchyard-upstream"] == "base"
    assert json.loads(fresh_canned.served()[-1].body)["model"] == "lora-x"
    c = client(gateway_url).completions.create(model="canned-base", prompt="x")
    assert c.model == "canned-base" and c.usage.completion_tokens == 8


def test_streams_pass_through_chunk_by_chunk(stream_gateway):
    body = {**CHAT, "stream": True, "canned": {"chunks": 4, "chunk_delay_s": 0.3}}
    arrivals = []
    with httpx.stream("POST", stream_gateway.url + "/v1/chat/completions", json=body, headers=auth()) as r:
        assert r.headers["x-switchyard-mode"] == "adapter"
        for line in r.iter_lines():
            if line.startswith("data: "):
                arrivals.append((time.monotonic(), line[6:]))
    payloads = [p for _, p in arrivals]
    assert payloads[-1] == "[DONE]" and len(payloads) == 5
    assert all(json.loads(p)["model"] == "stable" for p in payloads[:-1])
    gaps = [b[0] - a[0] for a, b in zip(arrivals, arrivals[1:-1])]
    assert min(gaps) > 0.15  # each chunk arrived when the upstream sent it: nothing was buffered
    assert (stream_gateway.direct_writes() >= 3) == (stream_gateway.path == "direct")


def test_usage_chunk_is_requested_upstream_and_stripped_unless_asked(stream_gateway, fresh_canned):
    chunks = list(client(stream_gateway).chat.completions.create(**CHAT, stream=True))
    assert all(c.usage is None for c in chunks) and len(chunks) == 8
    upstream_sent = json.loads(fresh_canned.served()[-1].body)
    assert upstream_sent["stream_options"] == {"include_usage": True}
    asked = list(client(stream_gateway).chat.completions.create(**CHAT, stream=True, stream_options={"include_usage": True}))
    assert asked[-1].usage.completion_tokens == 8
    metrics = httpx.get(stream_gateway.url + "/metrics").text
    assert 'switchyard_completion_tokens_total{mode="adapter",route="stable"} 16.0' in metrics
    assert 'switchyard_requests_total{mode="adapter",route="stable",status="200"} 2.0' in metrics
    assert "switchyard_time_to_first_token_seconds_bucket" in metrics


def test_a_stream_counts_as_complete_when_the_engine_ends_its_body_late(stream_gateway, fresh_canned):
    body = {**CHAT, "model": "canned-base", "stream": True, "canned": {"chunks": 3, "end_delay_s": 0.3}}
    for _ in range(2):
        r = httpx.post(stream_gateway.url + "/v1/chat/completions", json=body, headers=auth())
        assert events_of(r.text)[-1] == "[DONE]"
    time.sleep(0.5)
    metrics = httpx.get(stream_gateway.url + "/metrics").text
    assert 'switchyard_requests_total{mode="base",route="canned-base",status="200"} 2.0' in metrics
    assert 'status="499"' not in metrics
    assert fresh_canned.completed == 2 and fresh_canned.aborted == 0


def test_hop_by_hop_headers_and_the_client_key_never_reach_the_engine(gateway_url, fresh_canned):
    headers = {**auth(), "Connection": "keep-alive, X-Private", "X-Private": "1", "Keep-Alive": "timeout=5",
               "TE": "trailers", "Proxy-Authorization": "x", "X-Request-Id": "req-42"}
    assert httpx.post(gateway_url.url + "/v1/chat/completions", json=CHAT, headers=headers).status_code == 200
    seen = fresh_canned.served()[-1].headers
    assert seen["x-request-id"] == "req-42"
    for h in ("x-private", "keep-alive", "te", "proxy-authorization", "authorization"):
        assert h not in seen, h


@pytest.mark.parametrize("path", ["/pause", "/resume", "/update_weights", "/collective_rpc", "/invocations",
                                  "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/health", "/tokenize"])
def test_engine_control_endpoints_are_never_proxied(gateway_url, fresh_canned, path):
    r = httpx.post(gateway_url.url + path, json={"lora_name": "x", "lora_path": "/tmp"}, headers=auth())
    assert r.status_code in (404, 405) and "error" in r.json()
    assert fresh_canned.served() == []


def test_openai_style_errors(gateway_url):
    url = gateway_url.url + "/v1/chat/completions"
    r = httpx.post(url, json={**CHAT, "model": "nope"}, headers=auth())
    assert r.status_code == 404 and "stable, canned-base" in r.json()["error"]["message"]
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.post(url, content=b"{not json", headers=auth()).status_code == 400
    assert httpx.post(url, json={"model": "stable"}, headers=auth()).status_code == 400
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 5_000_000}]}
    assert httpx.post(url, json=big, headers=auth()).status_code == 413
    admin = httpx.post(gateway_url.url + "/admin/adapters", content=b"x" * 5_000_000)  # no key, huge body
    assert admin.status_code == 413 and admin.json()["error"]["code"] == "request_too_large"
    r = httpx.post(url, json={**CHAT, "canned": {"status": 400}}, headers=auth())
    assert r.status_code == 400 and r.json()["error"]["message"] == "canned error 400"  # passed through


def test_client_keys(gateway_url):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=gateway_url.url + "/v1", api_key="wrong", max_retries=0).models.list()
    r = httpx.post(gateway_url.url + "/v1/chat/completions", json=CHAT)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_admin_api_needs_the_admin_key(gateway_url):
    url = gateway_url.url + "/admin/routes"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers=auth(CLIENT_KEY)).status_code == 403
    assert httpx.get(url, headers=auth("guess")).status_code == 403
    assert httpx.get(url, headers=auth(ADMIN_KEY)).json()["routes"][0]["name"] == "stable"
    assert httpx.post(gateway_url.url + "/v1/chat/completions", json=CHAT, headers=auth(ADMIN_KEY)).status_code == 401


def test_unreachable_upstream_gives_503_with_retry_after_and_readyz_names_the_route():
    dead = f"http://127.0.0.1:{free_port()}"
    with serve_gateway(dead, connect_retries=1) as server:
        r = httpx.post(server.url + "/v1/chat/completions", json=CHAT, headers=auth())
        assert r.status_code == 503 and r.headers["retry-after"] == "2"
        ready = httpx.get(server.url + "/readyz")
        assert ready.status_code == 503 and "stable" in ready.json()["error"]["message"]
        assert httpx.get(server.url + "/healthz").status_code == 200


def test_an_idle_engine_connection_is_dropped_before_the_engine_would_close_it(fresh_canned):
    """A request sent on a pooled connection just as the engine closes it for idleness fails (CI saw
    it after a rollback): the pool must give up idle connections first, and still reuse busy ones."""
    with serve_gateway(fresh_canned.url, upstream_keepalive_s=0.3, health_interval_s=60) as server:
        def port_of_next_request() -> int:
            before = len(fresh_canned.served())
            assert httpx.post(server.url + "/v1/completions", json={"model": "canned-base", "prompt": "x"},
                              headers=auth()).status_code == 200
            (rec,) = fresh_canned.served()[before:]
            return rec.client[1]

        first = port_of_next_request()
        assert port_of_next_request() == first  # reused while fresh
        time.sleep(0.6)
        assert port_of_next_request() != first  # idle past upstream_keepalive_s: a new connection


def test_the_gateway_keeps_idle_client_connections_longer_than_clients_do():
    """The same race on the client side: the OpenAI client (httpx) drops idle connections after 5 s,
    and uvicorn would close them after 5 s too; the gateway's server must hold them longer."""
    import uvicorn
    from openai._constants import DEFAULT_CONNECTION_LIMITS

    from gateway.app import server_options
    from gateway.settings import load_settings

    config = uvicorn.Config(lambda *a: None, **server_options(load_settings()))
    assert config.timeout_keep_alive > 2 * max(DEFAULT_CONNECTION_LIMITS.keepalive_expiry, httpx.Limits().keepalive_expiry)
    assert config.loop == "uvloop" and config.http is GatewayProtocol
    assert server_options(load_settings(direct_streams=False))["http"] == "httptools"  # the way back, if needed


@pytest.mark.parametrize("http", ["direct", "asgi"])
def test_upstream_timeouts(fresh_canned, http):
    with serve_gateway(fresh_canned.url, http=GatewayProtocol if http == "direct" else "httptools",
                       read_timeout_s=0.5, stream_idle_timeout_s=0.5) as server:
        r = httpx.post(server.url + "/v1/chat/completions", json={**CHAT, "canned": {"delay_s": 2}}, headers=auth())
        assert r.status_code == 504
        body = {**CHAT, "stream": True, "canned": {"chunks": 5, "hang_after": 2}}
        r = httpx.post(server.url + "/v1/chat/completions", json=body, headers=auth(), timeout=10)
        events = events_of(r.text)
        assert len(events) == 3 and "[DONE]" not in events
        assert json.loads(events[-1])["error"]["code"] == 504


@pytest.mark.parametrize("failure", [{"fail_after": 3}, {"truncate_after": 3}])
def test_a_broken_stream_ends_with_an_error_event_never_a_clean_end(stream_gateway, failure):
    stream = client(stream_gateway).chat.completions.create(**CHAT, stream=True, extra_body={"canned": failure})
    got = []
    with pytest.raises(openai.APIError, match="incomplete"):
        for chunk in stream:
            got.append(chunk)
    assert len(got) == 3


def test_client_disconnect_aborts_the_upstream_request(stream_gateway, fresh_canned):
    body = {**CHAT, "stream": True, "canned": {"chunks": 200, "chunk_delay_s": 0.05}}
    with httpx.stream("POST", stream_gateway.url + "/v1/chat/completions", json=body, headers=auth()) as r:
        it = r.iter_lines()
        assert next(it).startswith("data: ")
    deadline = time.monotonic() + 5
    while fresh_canned.aborted == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fresh_canned.aborted == 1 and fresh_canned.completed == 0
    ups = httpx.get(stream_gateway.url + "/admin/upstreams", headers=auth(ADMIN_KEY)).json()["upstreams"]
    assert ups[0]["in_flight"] == 0


def test_client_disconnect_aborts_a_plain_request_too(gateway_url, fresh_canned):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(gateway_url.url + "/v1/chat/completions", json={**CHAT, "canned": {"delay_s": 3}},
                   headers=auth(), timeout=0.5)
    deadline = time.monotonic() + 5
    while fresh_canned.aborted == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fresh_canned.aborted == 1  # the engine saw the disconnect long before its 3 s were up
    assert gateway_url.gateway.in_flight("base") == 0


def test_a_route_switch_while_streams_run_loses_none_of_them(stream_gateway, fresh_canned):
    n, chunks = 8, 12
    results: list[list[str]] = [[] for _ in range(n)]

    def run(i):
        with client(stream_gateway).chat.completions.create(
                **CHAT, stream=True, extra_body={"canned": {"chunks": chunks, "chunk_delay_s": 0.05}}) as s:
            results[i] = [c.model for c in s]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    admin = auth(ADMIN_KEY)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # switch while all streams are in flight
        ups = httpx.get(stream_gateway.url + "/admin/upstreams", headers=admin).json()["upstreams"]
        if ups[0]["in_flight"] == n:
            break
        time.sleep(0.02)
    assert ups[0]["in_flight"] == n
    r = httpx.put(stream_gateway.url + "/admin/routes/stable", headers=admin,
                  json={"upstream": "base", "upstream_model": "lora-y", "mode": "adapter"})
    assert r.status_code == 200
    for t in threads:
        t.join(20)
    assert all(r == ["stable"] * chunks for r in results)  # every stream finished, under the stable name
    sent = [json.loads(rec.body)["model"] for rec in fresh_canned.served() if rec.path.endswith("completions")
            and b'"stream":true' in rec.body]
    assert sent[:n] == ["lora-x"] * n  # the old route, kept by each in-flight request
    client(stream_gateway).chat.completions.create(**CHAT)
    assert json.loads(fresh_canned.served()[-1].body)["model"] == "lora-y"  # new requests see the new table
    metrics = httpx.get(stream_gateway.url + "/metrics").text
    assert 'switchyard_route_switches_total{route="stable"} 2.0' in metrics  # created, then switched


def test_an_unexpected_error_on_a_proxied_route_is_an_openai_style_500(fresh_canned, monkeypatch):
    """The proxied routes are served ahead of FastAPI's error middleware: they format their own 500."""
    import gateway.app

    async def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(gateway.app, "handle_completion", broken)
    with serve_gateway(fresh_canned.url) as server:
        r = httpx.post(server.url + "/v1/chat/completions", json=CHAT, headers=auth())
        assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
        assert "a bug" not in r.text  # internals stay in the log
        assert httpx.get(server.url + "/healthz").status_code == 200
