"""What does the upstream half of the streaming path cost? aiohttp's reader against a bare Protocol.

    .venv/bin/python benchmarks/stream_reader.py [--concurrency 32] [--requests 2048] [--chunk-delay-ms 0] [--rounds 3]

One process plays the gateway's upstream side only: it sends streamed `/v1/completions` requests to the
canned upstream (`gateway.canned`, 16 SSE chunks, in its own process) and reads every body to its end,
`--concurrency` requests at a time over kept-alive connections. Two arms, interleaved per round:
`aiohttp` reads as the gateway does (a pooled `ClientSession`, `resp.content.iter_any()`); `protocol`
is an asyncio Protocol per connection with httptools' response parser (the request bytes written by
hand, body chunks counted in a callback). Neither does anything with the bytes, so the difference is
the reader's own CPU per request (this process's user + system time over the requests), i.e. what a
Protocol-based upstream client would save the gateway, before any work on the client side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


async def _aiohttp_arm(url: str, body: bytes, requests: int, concurrency: int) -> int:
    import aiohttp

    read = 0
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=4)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        async def worker(n: int) -> None:
            nonlocal read
            for _ in range(n):
                async with session.post(url + "/v1/completions", data=body,
                                        headers={"content-type": "application/json"}) as resp:
                    async for chunk in resp.content.iter_any():
                        read += len(chunk)

        await asyncio.gather(*(worker(requests // concurrency) for _ in range(concurrency)))
    return read


class _Reader(asyncio.Protocol):
    def __init__(self) -> None:
        import httptools

        self._parser_type = httptools.HttpResponseParser
        self.transport, self.read, self.done = None, 0, None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def start(self, request: bytes) -> asyncio.Future:
        self.parser = self._parser_type(self)
        self.done = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self.done

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_body(self, body: bytes) -> None:
        self.read += len(body)  # where the gateway would frame, rewrite and write to its client

    def on_message_complete(self) -> None:
        self.done.set_result(None)

    def connection_lost(self, exc) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError("upstream closed mid-response"))


async def _protocol_arm(host: str, port: int, body: bytes, requests: int, concurrency: int) -> int:
    loop = asyncio.get_running_loop()
    request = (b"POST /v1/completions HTTP/1.1\r\nhost: %s:%d\r\ncontent-type: application/json\r\n"
               b"content-length: %d\r\n\r\n" % (host.encode(), port, len(body))) + body
    readers: list[_Reader] = []

    async def worker(n: int) -> None:
        transport, reader = await loop.create_connection(_Reader, host, port)
        readers.append(reader)
        for _ in range(n):
            await reader.start(request)
        transport.close()

    await asyncio.gather(*(worker(requests // concurrency) for _ in range(concurrency)))
    return sum(r.read for r in readers)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--requests", type=int, default=2048, help="per arm and round")
    p.add_argument("--chunks", type=int, default=16)
    p.add_argument("--chunk-delay-ms", type=float, default=0.0, help="canned upstream: gap between chunks")
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()

    import uvloop

    from benchmarks.gateway import cpu_seconds, start_canned
    from deploy.engines import free_port

    port = free_port()
    upstream = start_canned(port)
    body = json.dumps({"model": "canned-base", "prompt": "x", "stream": True,
                       "canned": {"chunks": a.chunks, "chunk_delay_s": a.chunk_delay_ms / 1000}}).encode()
    url = f"http://127.0.0.1:{port}"
    results: dict[str, list[float]] = {"aiohttp": [], "protocol": []}

    async def run() -> None:
        for rnd in range(a.rounds):
            for arm in results:
                c0, w0 = cpu_seconds(os.getpid()), time.perf_counter()
                if arm == "aiohttp":
                    read = await _aiohttp_arm(url, body, a.requests, a.concurrency)
                else:
                    read = await _protocol_arm("127.0.0.1", port, body, a.requests, a.concurrency)
                n = a.requests // a.concurrency * a.concurrency
                us = (cpu_seconds(os.getpid()) - c0) / n * 1e6
                results[arm].append(us)
                print(f"round {rnd}  {arm:8s} {us:6.0f} µs CPU/request  ({n} requests, {read / n:.0f} B each, "
                      f"{time.perf_counter() - w0:.1f} s)", flush=True)

    try:
        uvloop.run(run())
    finally:
        upstream.terminate()
        upstream.wait(10)
    for arm, values in results.items():
        print(f"{arm:8s} µs CPU/request by round: {' / '.join(f'{v:.0f}' for v in values)}")


if __name__ == "__main__":
    main()
