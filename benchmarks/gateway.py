"""Gateway overhead: streaming latency and request rate through the gateway vs the same upstream
called directly, at several concurrencies. Raw per-request timings are written first (JSON);
the summary is computed from them.

    .venv/bin/python benchmarks/gateway.py                       # canned upstream (isolates the gateway)
    .venv/bin/python benchmarks/gateway.py --vllm --concurrency 1 16 --max-tokens 16   # real demo engine

Upstream "canned": `python -m gateway.canned`, a minimal ASGI app (uvloop + httptools) that streams
`--chunks` fixed SSE chunks, at once (the default: closed-loop saturation, which measures the maximum
request rate) or `--chunk-delay-ms` apart (paced like an engine producing tokens, which is what
"N concurrent streams" means for an LLM gateway); whatever it costs is paid by both arms alike. The gateway runs
as `switchyard gateway` (uvloop + httptools), in its own process. Each concurrency level runs the
arms alternately (direct, gateway, direct, gateway ...) for `--rounds` rounds of `--seconds` each.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx
import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deploy.engines import free_port, wait_ok  # noqa: E402


def wait_http(url: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def start_canned(port: int) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-m", "gateway.canned", "--port", str(port)], cwd=ROOT)
    wait_http(f"http://127.0.0.1:{port}/health")
    return p


def start_gateway(config: Path, upstream: str, port: int, cpus: set[int] | None = None,
                  env: dict[str, str] | None = None, checkout: Path | None = None, log=None) -> subprocess.Popen:
    """`switchyard gateway` in its own process, with this interpreter; `checkout`: run another
    checkout's code instead (e.g. an earlier commit from `git archive`) with the same libraries.
    Returns once the gateway is ready."""
    env = {**os.environ, "SWITCHYARD_API_KEYS": "", "SWITCHYARD_ADMIN_KEY": "", **(env or {})}
    if checkout is not None:  # that checkout's code first; other entries (e.g. vLLM's site) stay
        rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != ROOT]
        env["PYTHONPATH"] = os.pathsep.join([str(checkout), *rest])
    pin = ["taskset", "-c", ",".join(map(str, sorted(cpus)))] if cpus else []
    p = subprocess.Popen([*pin, sys.executable, "-m", "switchyard", "gateway", "--config", str(config),
                          "--engine", upstream, "--port", str(port)], cwd=checkout or ROOT, env=env,
                         stdout=log, stderr=subprocess.STDOUT if log else None)
    wait_http(f"http://127.0.0.1:{port}/healthz")
    if not wait_ok(f"http://127.0.0.1:{port}/readyz", timeout_s=60, poll_s=0.2):
        raise RuntimeError("the gateway never became ready")
    return p


async def one(session: aiohttp.ClientSession, url: str, body: bytes) -> tuple[float, float, float] | None:
    t0 = time.perf_counter()
    first = None
    async with session.post(url, data=body, headers={"content-type": "application/json"}) as r:
        if r.status != 200:
            await r.read()
            return None
        tail = b""
        async for chunk in r.content.iter_any():
            if first is None:
                first = time.perf_counter()
            tail = (tail + chunk)[-64:]
        if b"[DONE]" not in tail:
            return None
    return t0, first or time.perf_counter(), time.perf_counter()


async def load(url: str, body: bytes, concurrency: int, seconds: float,
               spread_s: float = 0.0) -> tuple[list[tuple], float, int]:
    """`concurrency` closed-loop clients for `seconds`: (per-request (start, first, end), elapsed, errors).
    Client i starts i/concurrency of `spread_s` late: paced streams that all started together would
    stay in lockstep, every chunk of every stream arriving in the same instant, which no real
    population of clients does."""
    records: list[tuple] = []
    errors = 0
    conn = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as session:
        await asyncio.gather(*(one(session, url, body) for _ in range(concurrency)))  # warm the pools
        stop = time.perf_counter() + seconds

        async def client(i: int):
            nonlocal errors
            await asyncio.sleep(spread_s * i / concurrency)
            while time.perf_counter() < stop:
                rec = await one(session, url, body)
                if rec is None:
                    errors += 1
                else:
                    records.append(rec)

        t0 = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(concurrency)))
        elapsed = time.perf_counter() - t0
    return records, elapsed, errors


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc; 0 where unavailable)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def summarize(raw: list[dict]) -> list[dict]:
    rows = []
    for c in sorted({r["concurrency"] for r in raw}):
        row = {"concurrency": c}
        for arm in ("direct", "gateway"):
            runs = [r for r in raw if r["concurrency"] == c and r["arm"] == arm]
            lat = [(e - s) * 1e3 for r in runs for s, f, e in r["records"]]
            ttft = [(f - s) * 1e3 for r in runs for s, f, e in r["records"]]
            served = sum(len(r["records"]) + r["errors"] + c for r in runs)  # + the warm-up requests
            row[arm] = {"n": len(lat), "errors": sum(r["errors"] for r in runs),
                        "cpu_us_per_request": 1e6 * sum(r["cpu_s"] for r in runs) / max(1, served),
                        "rps": statistics.mean(len(r["records"]) / r["elapsed"] for r in runs),
                        "p50_ms": pct(lat, 0.5), "p99_ms": pct(lat, 0.99),
                        "ttft_p50_ms": pct(ttft, 0.5), "ttft_p99_ms": pct(ttft, 0.99)}
        row["added_p50_ms"] = row["gateway"]["p50_ms"] - row["direct"]["p50_ms"]
        row["added_p99_ms"] = row["gateway"]["p99_ms"] - row["direct"]["p99_ms"]
        rows.append(row)
    return rows


def markdown(rows: list[dict], label: str) -> str:
    out = [f"| {label}: concurrent streams | direct p50 / p99 ms | gateway p50 / p99 ms | added p50 / p99 ms "
           "| added TTFT p50 / p99 ms | direct req/s | gateway req/s | gateway CPU µs/req | errors (d/g) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d, g = r["direct"], r["gateway"]
        out.append(f"| {r['concurrency']} | {d['p50_ms']:.2f} / {d['p99_ms']:.2f} | {g['p50_ms']:.2f} / {g['p99_ms']:.2f} "
                   f"| {r['added_p50_ms']:+.2f} / {r['added_p99_ms']:+.2f} "
                   f"| {g['ttft_p50_ms'] - d['ttft_p50_ms']:+.2f} / {g['ttft_p99_ms'] - d['ttft_p99_ms']:+.2f} "
                   f"| {d['rps']:.0f} | {g['rps']:.0f} "
                   f"| {g['cpu_us_per_request']:.0f} "
                   f"| {d['errors']}/{g['errors']} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 128])
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--chunks", type=int, default=16, help="canned: SSE chunks per response")
    p.add_argument("--chunk-delay-ms", type=float, default=0.0,
                   help="canned: gap between chunks (0: all at once; 20 = a 50 token/s stream)")
    p.add_argument("--pin-gateway", action="store_true",
                   help="give the gateway the last CPU to itself and everything else the others (taskset), "
                        "as a deployment would, so its added latency is not queueing behind the load generator")
    p.add_argument("--vllm", action="store_true", help="upstream = the demo vLLM engine (artifacts/demo)")
    p.add_argument("--max-tokens", type=int, default=16, help="vllm: tokens per streamed completion")
    p.add_argument("--demo-dir", type=Path, default=Path(os.environ.get("SWITCHYARD_DEMO_DIR", ROOT / "artifacts" / "demo")),
                   help="vllm: the demo folder whose base model is served")
    p.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "switchyard-gateway-bench.json",
                   help="raw per-request timings and the summary (JSON)")
    a = p.parse_args()

    procs: list[subprocess.Popen] = []
    gateway_cpus = None
    if a.pin_gateway:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            raise SystemExit("--pin-gateway needs at least 2 CPUs")
        gateway_cpus = {cpus[-1]}
        os.sched_setaffinity(0, set(cpus[:-1]))  # this process and the upstream it starts
    engine = None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            if a.vllm:
                from deploy.engines import Engine, EngineLaunch
                from switchyard.config import load_config

                cfg = load_config(a.demo_dir / "switchyard.toml")
                engine = Engine(EngineLaunch(model=cfg.base.model, served_name=cfg.base.name, port=free_port(),
                                             max_model_len=cfg.engine.max_model_len, kv_cache_gib=cfg.engine.kv_cache_gib,
                                             log_path=Path(tmp) / "engine.log")).start(cfg.engine.start_timeout_s)
                upstream, config, model = engine.url, cfg.source, cfg.base.name
                body = {"model": model, "prompt": "abc", "max_tokens": a.max_tokens, "stream": True,
                        "ignore_eos": True}
                path = "/v1/completions"
            else:
                port = free_port()
                procs.append(start_canned(port))
                upstream, model = f"http://127.0.0.1:{port}", "canned-base"
                config = Path(tmp) / "switchyard.toml"
                config.write_text('[base]\nmodel = "base"\nname = "canned-base"\n')
                body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True,
                        "canned": {"chunks": a.chunks, "chunk_delay_s": a.chunk_delay_ms / 1e3}}
                path = "/v1/chat/completions"
            gport = free_port()
            gateway = start_gateway(config, upstream, gport, gateway_cpus)
            procs.append(gateway)
            urls = {"direct": upstream + path, "gateway": f"http://127.0.0.1:{gport}{path}"}
            raw = []
            payload = json.dumps(body).encode()
            spread = a.chunks * a.chunk_delay_ms / 1e3 if not a.vllm else 0.0  # one paced response's length
            for c in a.concurrency:
                for rnd in range(a.rounds):
                    for arm in ("direct", "gateway"):
                        cpu0 = cpu_seconds(gateway.pid)
                        recs, elapsed, errors = uvloop.run(load(urls[arm], payload, c, a.seconds, spread))
                        cpu = cpu_seconds(gateway.pid) - cpu0  # ~0 for the direct arm: the gateway idles
                        raw.append({"arm": arm, "concurrency": c, "round": rnd, "elapsed": elapsed,
                                    "errors": errors, "records": recs, "cpu_s": cpu,
                                    "loadavg": os.getloadavg()[0]})
                        print(f"c={c:<4} {arm:<8} round {rnd}: {len(recs) / elapsed:7.0f} req/s, {errors} errors",
                              file=sys.stderr)
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(10)
        if engine is not None:
            engine.stop()
    rows = summarize(raw)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = a.out.with_suffix(".tmp")
    tmp_out.write_text(json.dumps({"argv": sys.argv, "upstream": f"vllm:{a.demo_dir}" if a.vllm else "canned",
                                   "gateway_cpus": sorted(gateway_cpus or []), "cpus": os.cpu_count(), "loadavg_end": os.getloadavg(),
                                   "summary": rows, "raw": raw}))
    tmp_out.replace(a.out)
    print(markdown(rows, "vLLM demo" if a.vllm else
                   f"canned, {a.chunks} chunks {a.chunk_delay_ms:g} ms apart" if a.chunk_delay_ms else "canned"))
    print(f"load average during the run: {min(r['loadavg'] for r in raw):.1f}..{max(r['loadavg'] for r in raw):.1f}"
          f" on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
