"""Prometheus metrics, one CollectorRegistry per app (two gateways in one process never collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# seconds; dense below 10 ms because the gateway's own cost lives there
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("switchyard_requests", "Completion requests by route, mode and status",
                                ["route", "mode", "status"], registry=r)
        self.latency = Histogram("switchyard_request_latency_seconds", "Arrival to last byte",
                                 ["route", "mode"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("switchyard_time_to_first_token_seconds", "Arrival to first streamed event",
                              ["route", "mode"], buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("switchyard_prompt_tokens", "Prompt tokens (from usage)",
                                     ["route", "mode"], registry=r)
        self.completion_tokens = Counter("switchyard_completion_tokens", "Completion tokens (from usage)",
                                         ["route", "mode"], registry=r)
        self.in_flight = Gauge("switchyard_in_flight_requests", "Requests being served, by upstream",
                               ["upstream"], registry=r)
        self.upstream_healthy = Gauge("switchyard_upstream_healthy", "1 when the upstream last generated",
                                      ["upstream"], registry=r)
        self.route_switches = Counter("switchyard_route_switches", "Route changes (switch, add, remove)",
                                      ["route"], registry=r)

        self._routes: dict[tuple[str, str], RouteMetrics] = {}

    def route(self, name: str, mode: str) -> "RouteMetrics":
        """The labelled children for one route, looked up once (labels() costs a lock and a dict)."""
        key = (name, mode)
        found = self._routes.get(key)
        if found is None:
            found = self._routes[key] = RouteMetrics(self, name, mode)
        return found

    def observe_usage(self, route: str, mode: str, usage: tuple[int, int] | None) -> None:
        self.route(route, mode).usage(usage)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RouteMetrics:
    def __init__(self, m: GatewayMetrics, name: str, mode: str) -> None:
        self._m, self._name, self._mode = m, name, mode
        self.latency = m.latency.labels(name, mode)
        self.ttft = m.ttft.labels(name, mode)
        self._prompt = m.prompt_tokens.labels(name, mode)
        self._completion = m.completion_tokens.labels(name, mode)
        self._status: dict[str, object] = {}

    def count(self, status: str) -> None:
        child = self._status.get(status)
        if child is None:
            child = self._status[status] = self._m.requests.labels(self._name, self._mode, status)
        child.inc()

    def usage(self, usage: tuple[int, int] | None) -> None:
        if usage is not None:
            self._prompt.inc(usage[0])
            self._completion.inc(usage[1])
