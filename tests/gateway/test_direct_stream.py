"""The streaming path's own parts: the direct writer (against the installed uvicorn), the engine
connections and their pool, back-pressure from a slow client, and error answers to streams."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import time

import httpx
import pytest

from deploy.engines import free_port
from gateway.canned import ServerThread, serve_lifespan
from gateway.engine_stream import EngineConnection, EngineGone, EnginePool, EngineSilent, request_bytes
from gateway.server import EXTENSION, GatewayProtocol
from tests.gateway.conftest import CLIENT_KEY, auth, serve_gateway

CHAT = {"model": "stable", "messages": [{"role": "user", "content": "hi"}]}


class _WritesDirectly:
    """An ASGI app that writes its body through the direct writer when the server offers one."""

    def __init__(self) -> None:
        self.offered: list[bool] = []

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            return await serve_lifespan(receive, send)
        writer = scope.get("extensions", {}).get(EXTENSION)
        self.offered.append(writer is not None)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        for piece in (b"hello ", b"", b"world"):
            if writer is not None and writer.usable:
                writer.write(piece)
            else:
                await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": b"!", "more_body": False})


@pytest.mark.parametrize("http_impl", [GatewayProtocol, "httptools"])
def test_direct_writes_make_a_valid_chunked_response_on_a_kept_connection(http_impl):
    """Checks the parts of uvicorn the direct writer relies on: two responses on one connection,
    each framed correctly, under GatewayProtocol; plain uvicorn offers no writer."""
    app = _WritesDirectly()
    with ServerThread(app, free_port(), http=http_impl, log_level="critical") as server:
        conn = http.client.HTTPConnection("127.0.0.1", int(server.url.rsplit(":", 1)[1]), timeout=5)
        socks = []
        for _ in range(2):
            conn.request("GET", "/")
            r = conn.getresponse()
            assert r.status == 200 and r.getheader("transfer-encoding") == "chunked"
            assert r.read() == b"hello world!"
            socks.append(conn.sock)
        assert socks[0] is not None and socks[0] is socks[1]  # the same connection served both
        conn.close()
    assert app.offered == [http_impl is GatewayProtocol] * 2


def test_streams_reuse_engine_connections_until_they_idle_out(fresh_canned):
    with serve_gateway(fresh_canned.url, upstream_keepalive_s=0.4, health_interval_s=60) as server:
        def port_of_next_stream() -> int:
            before = len(fresh_canned.served())
            body = {"model": "canned-base", "prompt": "x", "stream": True}
            r = httpx.post(server.url + "/v1/completions", json=body, headers=auth())
            assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
            (rec,) = fresh_canned.served()[before:]
            return rec.client[1]

        first = port_of_next_stream()
        assert port_of_next_stream() == first
        assert server.gateway.engines.opened == 1
        time.sleep(0.8)
        assert port_of_next_stream() != first
        assert server.gateway.engines.opened == 2


def test_an_error_answer_to_a_stream_passes_through(stream_gateway):
    body = {**CHAT, "stream": True, "canned": {"status": 400}}
    r = httpx.post(stream_gateway.url + "/v1/chat/completions", json=body, headers=auth())
    assert r.status_code == 400 and r.json()["error"]["message"] == "canned error 400"
    assert r.headers["x-switchyard-upstream"] == "base"


def test_a_slow_client_pauses_the_engine_and_loses_nothing(stream_gateway, monkeypatch):
    """A client that does not read: the gateway must stop reading the engine (bounded memory), then
    deliver every event once the client reads again."""
    pauses = [0]
    original = EngineConnection.pause

    def counting(self) -> None:
        pauses[0] += 1
        original(self)

    monkeypatch.setattr(EngineConnection, "pause", counting)
    n = 30_000  # ~5 MB of events: more than the socket buffers between gateway and client hold
    body = json.dumps({**CHAT, "stream": True, "canned": {"chunks": n}}).encode()
    port = int(stream_gateway.url.rsplit(":", 1)[1])
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                 b"authorization: Bearer %s\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
                 % (CLIENT_KEY.encode(), len(body)) + body)
    deadline = time.monotonic() + 20
    while pauses[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pauses[0] > 0, "the engine connection was never paused for the slow client"
    sock.settimeout(30)
    raw = bytearray()
    while chunk := sock.recv(1 << 16):
        raw += chunk
    sock.close()
    text = raw.decode()
    assert text.count('"model":"stable"') == n
    assert text.rstrip().endswith("0") and "data: [DONE]" in text


# --- the engine connection on its own, against a scripted server ----------------------------------

async def _scripted(handler):
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def _read_request(reader) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    length = int([ln for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length")][0].split(b":")[1])
    await reader.readexactly(length)


def test_engine_connection_errors_say_whether_a_response_had_started():
    async def run():
        async def garbage(reader, writer):
            await _read_request(reader)
            writer.write(b"NOT HTTP AT ALL\r\n\r\n")
            await writer.drain()

        async def hang_up(reader, writer):
            await _read_request(reader)
            writer.close()

        async def silent(reader, writer):
            await _read_request(reader)
            await asyncio.sleep(5)

        pool = EnginePool(idle_s=5, connect_timeout_s=2)
        results = {}
        for name, handler in (("garbage", garbage), ("hang_up", hang_up), ("silent", silent)):
            server, url = await _scripted(handler)
            conn = await pool.connect(url)
            conn.send(request_bytes("POST", url, "/x", {}, b"{}"), timeout_s=0.3)
            with pytest.raises((EngineGone, EngineSilent)) as info:
                await conn.head()
            results[name] = info.value
            assert conn.closed
            server.close()
        return results

    results = asyncio.run(run())
    assert isinstance(results["garbage"], EngineGone) and "malformed" in str(results["garbage"])
    assert isinstance(results["hang_up"], EngineGone) and results["hang_up"].before_response
    assert isinstance(results["silent"], EngineSilent)


def test_a_finished_stream_goes_back_to_the_pool_only_once_its_body_has_ended():
    async def run():
        release = asyncio.Event()

        async def late_end(reader, writer):
            for _ in range(3):
                await _read_request(reader)
                writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
                await writer.drain()
                await release.wait()
                release.clear()
                writer.write(b"0\r\n\r\n")
                await writer.drain()

        server, url = await _scripted(late_end)
        pool = EnginePool(idle_s=5, connect_timeout_s=2, drain_s=0.3)
        seen = []

        class Sink:
            def body(self, data):
                seen.append(data)

            def end(self, error):
                seen.append(error)

        async def one(end_within: bool) -> EngineConnection:
            conn = await pool.connect(url)
            conn.send(request_bytes("POST", url, "/x", {}, b"{}"), timeout_s=2)
            assert (await conn.head())[0] == 200
            conn.relay(Sink())
            await asyncio.sleep(0.05)
            assert seen[-1] == b"hello"
            pool.finish(conn)  # the caller is done; the body's end has not arrived yet
            if end_within:
                release.set()
            await asyncio.sleep(0.5)
            return conn

        first = await one(end_within=True)
        again = await pool.connect(url)
        assert again is first and not first.closed  # pooled once its end arrived
        pool._put(again)
        second = await one(end_within=False)
        assert second is first and second.closed  # its end never came within drain_s: closed
        server.close()
        return seen

    seen = asyncio.run(run())
    assert None not in seen  # the sink saw no end: the caller had let go before it
