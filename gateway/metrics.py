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

    def observe_usage(self, route: str, mode: str, usage: tuple[int, int] | None) -> None:
        if usage is not None:
            self.prompt_tokens.labels(route, mode).inc(usage[0])
            self.completion_tokens.labels(route, mode).inc(usage[1])

    def render(self) -> bytes:
        return generate_latest(self.registry)
