"""What could a cheaper streaming path buy? The gateway against the cheapest HTTP/1.1 relay Python can do.

    .venv/bin/python benchmarks/relay_bound.py [--concurrency 128] [--seconds 10] [--rounds 2]

Three arms on the same canned upstream (`gateway.canned`, 16 SSE chunks 20 ms apart, client starts
spread over one response, as `benchmarks/gateway.py --chunk-delay-ms 20`), interleaved per round:
`direct` (the upstream itself), `gateway` (`switchyard gateway`), and `relay`: uvloop with one
asyncio Protocol per client connection that forwards the request bytes and writes every upstream read
straight to the client transport (no HTTP parsing of the response, no model renaming, no metrics,
no error handling). `relay` is not a product: it is the lower bound on the CPU per streamed event of a
Python proxy that drops aiohttp's reader and the ASGI layer, i.e. what rewriting the gateway's
streaming path as Protocols could buy at most. Prints latency added over `direct` and each proxy's CPU
per request (its process's user + system time over the requests it served).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# --- the relay (runs in its own process: `relay_bound.py --serve UPSTREAM_PORT PORT`) ---------------

class _Upstream(asyncio.Protocol):
    def __init__(self, client: "_Client") -> None:
        self.client, self.transport = client, None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.client.transport.write(data)  # one write per upstream read, nothing parsed

    def connection_lost(self, exc) -> None:
        self.client.upstream = None


class _Client(asyncio.Protocol):
    upstream_port = 0

    def connection_made(self, transport) -> None:
        self.transport, self.buf, self.upstream, self.pending = transport, b"", None, []

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (head_end := self.buf.find(b"\r\n\r\n")) >= 0:
            length = 0
            for line in self.buf[:head_end].split(b"\r\n")[1:]:
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            total = head_end + 4 + length
            if len(self.buf) < total:
                return
            request, self.buf = self.buf[:total], self.buf[total:]
            if self.upstream is not None and self.upstream.transport is not None:
                self.upstream.transport.write(request)
            else:
                self.pending.append(request)
                if len(self.pending) == 1:
                    asyncio.ensure_future(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(lambda: _Upstream(self), "127.0.0.1", self.upstream_port)
        self.upstream = proto
        for r in self.pending:
            proto.transport.write(r)
        self.pending = []

    def connection_lost(self, exc) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()


def serve(upstream_port: int, port: int) -> None:
    import uvloop

    _Client.upstream_port = upstream_port

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(_Client, "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    uvloop.run(main())


# --- the measurement -----------------------------------------------------------------------------

def main() -> None:
    import uvloop

    from benchmarks.gateway import cpu_seconds, load, pct, start_canned, start_gateway
    from deploy.engines import free_port

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", type=int, default=128)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--chunks", type=int, default=16)
    p.add_argument("--chunk-delay-ms", type=float, default=20.0)
    p.add_argument("--asgi-arm", action="store_true",
                   help="add `gateway-asgi`: the gateway with SWITCHYARD_DIRECT_STREAMS=false (streams through ASGI sends)")
    p.add_argument("--baseline", type=Path, metavar="CHECKOUT",
                   help="add `baseline`: the gateway of another checkout (e.g. `git worktree add /tmp/prev HEAD~1`)")
    a = p.parse_args()
    procs: list[subprocess.Popen] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            port = free_port()
            procs.append(start_canned(port))
            upstream = f"http://127.0.0.1:{port}"
            config = Path(tmp) / "switchyard.toml"
            config.write_text('[base]\nmodel = "base"\nname = "canned-base"\n')
            gport, rport = free_port(), free_port()
            gateway = start_gateway(config, upstream, gport)
            procs.append(gateway)
            relay = subprocess.Popen([sys.executable, __file__, "--serve", str(port), str(rport)])
            procs.append(relay)
            extra = {}
            if a.asgi_arm:
                extra["gateway-asgi"] = start_gateway(config, upstream, free_port(),
                                                      env={"SWITCHYARD_DIRECT_STREAMS": "false"})
            if a.baseline:
                extra["baseline"] = start_gateway(config, upstream, free_port(), checkout=a.baseline.resolve())
            procs += extra.values()
            time.sleep(1.0)
            body = json.dumps({"model": "canned-base", "messages": [{"role": "user", "content": "hi"}],
                               "stream": True, "canned": {"chunks": a.chunks,
                                                          "chunk_delay_s": a.chunk_delay_ms / 1e3}}).encode()
            path = "/v1/chat/completions"
            arms = {"direct": (upstream + path, None), "gateway": (f"http://127.0.0.1:{gport}{path}", gateway.pid),
                    "relay": (f"http://127.0.0.1:{rport}{path}", relay.pid)}
            for arm, proc in extra.items():
                arms[arm] = (f"http://127.0.0.1:{proc.args[proc.args.index('--port') + 1]}{path}", proc.pid)
            res = {arm: {"lat": [], "ttft": [], "cpu": 0.0, "n": 0, "errors": 0} for arm in arms}
            spread = a.chunks * a.chunk_delay_ms / 1e3
            for rnd in range(a.rounds):
                for arm, (url, pid) in arms.items():
                    cpu0 = cpu_seconds(pid) if pid else 0.0
                    recs, elapsed, errors = uvloop.run(load(url, body, a.concurrency, a.seconds, spread))
                    r = res[arm]
                    r["cpu"] += cpu_seconds(pid) - cpu0 if pid else 0.0
                    r["n"] += len(recs) + errors + a.concurrency  # + the warm-up requests
                    r["errors"] += errors
                    r["lat"] += [(e - s) * 1e3 for s, f, e in recs]
                    r["ttft"] += [(f - s) * 1e3 for s, f, e in recs]
                    print(f"round {rnd} {arm}: {len(recs) / elapsed:.0f} req/s, {errors} errors", file=sys.stderr)
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(10)
    d = res["direct"]
    print(f"{a.concurrency} paced streams ({a.chunks} chunks {a.chunk_delay_ms:g} ms apart), "
          f"{a.rounds} rounds of {a.seconds:g} s per arm")
    print("| arm | p50 / p99 ms | added p50 / p99 ms | TTFT p50 ms | proxy CPU µs/request | errors |")
    print("|---|---|---|---|---|---|")
    for arm, r in res.items():
        print(f"| {arm} | {pct(r['lat'], .5):.1f} / {pct(r['lat'], .99):.1f} "
              f"| {pct(r['lat'], .5) - pct(d['lat'], .5):+.2f} / {pct(r['lat'], .99) - pct(d['lat'], .99):+.2f} "
              f"| {pct(r['ttft'], .5):.2f} | {1e6 * r['cpu'] / max(1, r['n']):.0f} | {r['errors']} |")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--serve":
        serve(int(sys.argv[2]), int(sys.argv[3]))
    else:
        main()
