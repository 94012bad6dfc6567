"""`Gateway`: the routing table, the upstream engines and the shared HTTP client, as one object.

The internal Python API that `deploy` drives (all methods run on the app's event loop):

    gw = Gateway(settings)                       # or Gateway(settings, session_factory=...)
    gw.add_upstream("base", "http://127.0.0.1:8001", max_lora_rank=8, base_model=Path(...))
    gw.set_route(Route("reverse-bot", "base", "reverse-bot", "adapter"))
    gw.table                                     # the current RoutingTable (immutable)
    gw.replace_table(table)                      # atomic swap; in-flight requests keep their route
    gw.in_flight("base"); await gw.drain("base", timeout_s=30)
    await gw.load_adapter("base", "reverse-v2", "/adapters/reverse-v2")   # checks first, then vLLM
    await gw.unload_adapter("base", "reverse-v2")
    await gw.check_health()                      # probe every upstream now: {name: healthy}
    gw.remove_upstream("merged-1")               # refused while a route still points at it

`start()`/`close()` (the app's lifespan does both) open the pooled client and run the periodic probe.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from typing import Callable

import aiohttp

from gateway.adapters import inspect_adapter, load_base_shapes
from gateway.core.adapter_checks import AdapterSummary
from gateway.core.errors import AdapterRejected, Conflict, GatewayError, NotFound, UpstreamUnavailable
from gateway.core.routing import Route, RoutingTable
from gateway.engine_stream import EnginePool
from gateway.metrics import GatewayMetrics
from gateway.settings import GatewaySettings
from gateway.upstream import Upstream, probe_and_record

_LORA_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


class UpstreamError(GatewayError):
    """An engine answered an admin call with an error; its status and message pass through."""

    type, code = "upstream_error", "upstream_error"

    def __init__(self, status: int, problem: str, hint: str = "") -> None:
        super().__init__(problem, hint)
        self.status = status


class Gateway:
    def __init__(self, settings: GatewaySettings, *, table: RoutingTable | None = None,
                 metrics: GatewayMetrics | None = None,
                 session_factory: Callable[[GatewaySettings], aiohttp.ClientSession] | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or GatewayMetrics()
        self._table = table or RoutingTable()
        self._upstreams: dict[str, Upstream] = {}
        self._session_factory = session_factory or default_session
        self._client: aiohttp.ClientSession | None = None
        # streamed completions: their own keep-alive pool, read by Protocols (gateway.engine_stream)
        self.engines = EnginePool(settings.upstream_keepalive_s, settings.connect_timeout_s)
        self._health_task: asyncio.Task | None = None
        self._probes: set[asyncio.Task] = set()  # strong references: the loop keeps only weak ones
        self._base_shapes: dict[Path, dict[str, tuple[int, int]]] = {}
        self._gauges: dict[str, object] = {}
        self.created = int(time.time())

    # --- lifecycle ------------------------------------------------------------------------------
    @property
    def client(self) -> aiohttp.ClientSession:
        """The one pooled HTTP client every upstream call shares (created on the running loop)."""
        if self._client is None:
            self._client = self._session_factory(self.settings)
        return self._client

    async def start(self, background_probe: bool = True) -> None:
        _ = self.client
        await self.check_health()
        if background_probe and self._health_task is None:
            self._health_task = asyncio.create_task(self._probe_loop(), name="switchyard-health")

    async def close(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            try:
                await self._health_task
            except asyncio.CancelledError:
                pass
            self._health_task = None
        inner = [u._probe_task for u in self._upstreams.values() if u._probe_task is not None]
        for task in [*self._probes, *inner]:
            task.cancel()
        await asyncio.gather(*self._probes, *inner, return_exceptions=True)
        self.engines.close()
        if self._client is not None:
            await self._client.close()
            self._client = None

    # --- routing --------------------------------------------------------------------------------
    @property
    def table(self) -> RoutingTable:
        return self._table

    def replace_table(self, table: RoutingTable) -> None:
        """Swap the whole table in one assignment; every route must name a registered upstream."""
        missing = sorted({r.upstream for r in table if r.upstream not in self._upstreams})
        if missing:
            raise NotFound(f"routes name unregistered upstreams: {', '.join(missing)}", "add_upstream them first")
        old = self._table
        self._table = table
        for name in set(old.names()) | set(table.names()):
            if old.get(name) != table.get(name):
                self.metrics.route_switches.labels(name).inc()

    def set_route(self, route: Route) -> None:
        self.replace_table(self._table.with_route(route))

    def remove_route(self, name: str) -> None:
        self.replace_table(self._table.without(name))

    # --- upstreams ------------------------------------------------------------------------------
    def add_upstream(self, name: str, url: str, *, max_lora_rank: int | None = None,
                     base_model: Path | None = None, probe_model: str | None = None) -> Upstream:
        """Register an engine. `max_lora_rank` and `base_model` enable runtime adapter loads on it."""
        if name in self._upstreams:
            raise Conflict(f"upstream {name!r} is already registered", "remove_upstream it first, or pick another name")
        up = Upstream(name, url, max_lora_rank=max_lora_rank, base_model=base_model, probe_model=probe_model)
        self._upstreams[name] = up
        self.metrics.in_flight.labels(name).set(0)
        self.metrics.upstream_healthy.labels(name).set(0)
        return up

    def remove_upstream(self, name: str) -> None:
        up = self.upstream(name)
        routed = [r.name for r in self._table.using_upstream(name)]
        if routed:
            raise Conflict(f"routes still point at upstream {name!r}: {', '.join(routed)}", "switch them first")
        del self._upstreams[up.name]
        self._gauges.pop(name, None)
        self.metrics.in_flight.remove(name)
        self.metrics.upstream_healthy.remove(name)

    def upstream(self, name: str) -> Upstream:
        try:
            return self._upstreams[name]
        except KeyError:
            known = ", ".join(self._upstreams) or "none"
            raise NotFound(f"no upstream named {name!r}", f"registered upstreams: {known}") from None

    def upstreams(self) -> tuple[Upstream, ...]:
        return tuple(self._upstreams.values())

    def in_flight(self, upstream: str) -> int:
        return self.upstream(upstream).in_flight

    async def drain(self, upstream: str, timeout_s: float) -> bool:
        """Wait until no request is in flight on `upstream` (route it elsewhere first). False on timeout."""
        return await self.upstream(upstream).wait_idle(timeout_s)

    def enter(self, up: Upstream) -> None:
        up.enter()
        self._in_flight_gauge(up).set(up.in_flight)

    def leave(self, up: Upstream) -> None:
        up.leave()
        if up.name in self._upstreams:
            self._in_flight_gauge(up).set(up.in_flight)

    def _in_flight_gauge(self, up: Upstream):
        """The upstream's labelled gauge, looked up once (labels() costs a lock and a dict per call)."""
        gauge = self._gauges.get(up.name)
        if gauge is None:
            gauge = self._gauges[up.name] = self.metrics.in_flight.labels(up.name)
        return gauge

    def available(self, route: Route) -> Upstream:
        """The route's upstream, or UpstreamUnavailable (503 + Retry-After) if it is gone or down."""
        up = self._upstreams.get(route.upstream)
        retry = self.settings.retry_after_s
        if up is None:
            raise UpstreamUnavailable(f"the engine for {route.name!r} ({route.upstream}) is not registered",
                                      "it is being replaced; retry shortly", retry)
        if up.state == "down":
            raise UpstreamUnavailable(f"the engine for {route.name!r} ({up.name}) is down or restarting",
                                      f"retry in {retry} s", retry)
        return up

    # --- health ---------------------------------------------------------------------------------
    async def check_health(self) -> dict[str, bool]:
        """Probe every upstream now (concurrently); each must generate one token to count as healthy."""
        ups = list(self._upstreams.values())
        results = await asyncio.gather(*(self._probe(u) for u in ups))
        return {u.name: ok for u, ok in zip(ups, results)}

    async def _probe(self, up: Upstream) -> bool:
        ok = await probe_and_record(self.client, up, self.settings.probe_timeout_s, self.settings.unhealthy_after)
        if up.name in self._upstreams:
            self.metrics.upstream_healthy.labels(up.name).set(1 if up.state == "healthy" else 0)
        return ok

    def suspect(self, up: Upstream, error: str, refused: bool) -> None:
        """A proxied request failed at the connection level: mark down if refused, and probe now."""
        if refused:
            up.mark_down(error)
            self.metrics.upstream_healthy.labels(up.name).set(0)
        if self._client is not None:
            self._spawn_probe(up)

    def _spawn_probe(self, up: Upstream) -> None:
        task = asyncio.get_running_loop().create_task(self._probe(up))
        self._probes.add(task)
        task.add_done_callback(self._probes.discard)

    async def _probe_loop(self) -> None:
        s = self.settings
        tick = min(0.25, s.down_probe_interval_s)
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            for up in list(self._upstreams.values()):
                period = s.down_probe_interval_s if up.state != "healthy" else s.health_interval_s
                if up.last_probe_at is None or now - up.last_probe_at >= period:
                    up.last_probe_at = now  # claims the slot before the probe runs
                    self._spawn_probe(up)

    # --- runtime adapters -------------------------------------------------------------------------
    def _shapes(self, up: Upstream) -> dict[str, tuple[int, int]]:
        if up.base_model is None or up.max_lora_rank is None:
            raise AdapterRejected(f"upstream {up.name!r} takes no runtime adapters",
                                  "register it with max_lora_rank and base_model (the base engine)")
        if up.base_model not in self._base_shapes:
            self._base_shapes[up.base_model] = load_base_shapes(up.base_model)
        return self._base_shapes[up.base_model]

    async def load_adapter(self, upstream: str, lora_name: str, path: str | Path) -> AdapterSummary:
        """Check the folder (see core.adapter_checks), then load it through vLLM's runtime LoRA API.
        A name already loaded, or being loaded by a concurrent call, is a Conflict (409): one load runs."""
        up = self.upstream(upstream)
        if not _LORA_NAME.match(lora_name or ""):
            raise AdapterRejected(f"adapter name {lora_name!r} is not allowed",
                                  "use letters, digits and . _ : - (at most 128 characters)")
        if lora_name in up.adapters or lora_name in up.loading or lora_name == up.probe_model:
            raise Conflict(f"an adapter named {lora_name!r} is already loaded on {up.name!r}",
                           "unload it first, or load under another name")
        root = self.settings.adapters_root
        if root is None:
            raise AdapterRejected("no adapters root is configured, so no adapter path is accepted",
                                  "set gateway.adapters_root in switchyard.toml or SWITCHYARD_ADAPTERS_ROOT")
        up.loading.add(lora_name)  # reserved before the first await: concurrent loads see it
        try:
            shapes = await asyncio.to_thread(self._shapes, up)
            folder, summary = await asyncio.to_thread(
                inspect_adapter, path, root=root, base=shapes, max_lora_rank=up.max_lora_rank)
            status, message = await self._admin_post(up, "/v1/load_lora_adapter",
                                                     {"lora_name": lora_name, "lora_path": str(folder)})
            if status != 200:
                if status == 400 and "already" in message:
                    raise Conflict(f"an adapter named {lora_name!r} is already loaded on {up.name!r}",
                                   "unload it first, or load under another name")
                raise UpstreamError(status, f"{up.name} refused the adapter: {message}")
            up.adapters.add(lora_name)
            return summary
        finally:
            up.loading.discard(lora_name)

    async def unload_adapter(self, upstream: str, lora_name: str) -> None:
        up = self.upstream(upstream)
        users = [r.name for r in self._table if r.upstream == up.name and r.upstream_model == lora_name]
        if users:
            raise Conflict(f"routes still use adapter {lora_name!r}: {', '.join(users)}", "switch them first")
        status, message = await self._admin_post(up, "/v1/unload_lora_adapter", {"lora_name": lora_name})
        if status == 404:
            raise NotFound(f"no adapter named {lora_name!r} is loaded on {up.name!r}", "GET /admin/upstreams lists them")
        if status != 200:
            raise UpstreamError(status, f"{up.name} refused to unload: {message}")
        up.adapters.discard(lora_name)

    async def _admin_post(self, up: Upstream, path: str, body: dict) -> tuple[int, str]:
        """(status, error message or body text) of an admin call to the engine."""
        try:
            async with self.client.post(f"{up.url}{path}", json=body,
                                        timeout=aiohttp.ClientTimeout(total=self.settings.probe_timeout_s * 3)) as r:
                return r.status, _message_of(await r.read())
        except aiohttp.ClientConnectorError as exc:
            self.suspect(up, f"connection refused ({exc.os_error})", refused=True)
            raise UpstreamUnavailable(f"{up.name} is not reachable", "retry when /readyz is ready",
                                      self.settings.retry_after_s) from None
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise UpstreamUnavailable(f"{up.name} did not answer: {type(exc).__name__}", "retry shortly",
                                      self.settings.retry_after_s) from None


def default_session(settings: GatewaySettings) -> aiohttp.ClientSession:
    """Pooled keep-alive connections to every engine; per-call timeouts are set by each caller.
    An idle connection is dropped before the engine would close it: reusing one the engine is closing
    fails the request, and no retry is allowed once bytes may have reached the engine."""
    connector = aiohttp.TCPConnector(limit=settings.max_connections, limit_per_host=0,
                                     keepalive_timeout=settings.upstream_keepalive_s,
                                     ttl_dns_cache=None)
    return aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                 timeout=aiohttp.ClientTimeout(total=None, sock_connect=settings.connect_timeout_s),
                                 skip_auto_headers=("User-Agent",))


def _message_of(raw: bytes) -> str:
    try:
        return str(json.loads(raw)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return raw.decode(errors="replace")[:500]
