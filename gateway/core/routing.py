"""Stable model names -> (upstream engine, the engine's name for the model, mode).

A `RoutingTable` is immutable: every change builds a new table, and the gateway swaps its reference
in one assignment. A request resolves its route once, on arrival, and keeps that `Route` even if
the table is swapped while it runs; new requests see the new table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Iterator, Literal, Mapping

from gateway.core.errors import UnknownModel

Mode = Literal["base", "adapter", "merged"]
MODES: tuple[str, ...] = ("base", "adapter", "merged")


@dataclass(frozen=True)
class Route:
    """`name` is what clients call; `upstream` names a registered engine; `upstream_model` is the
    engine's served name for it (the LoRA name on the base engine, or a merged engine's served name)."""

    name: str
    upstream: str
    upstream_model: str
    mode: Mode

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"route {self.name!r}: mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        for key in ("name", "upstream", "upstream_model"):
            if not getattr(self, key):
                raise ValueError(f"route {self.name!r}: {key} must not be empty")


@dataclass(frozen=True)
class RoutingTable:
    """An immutable name -> Route map. Iteration order is insertion order (stable for /v1/models)."""

    _routes: Mapping[str, Route] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_routes", MappingProxyType(dict(self._routes)))

    @classmethod
    def of(cls, routes: "list[Route] | tuple[Route, ...]") -> "RoutingTable":
        table: dict[str, Route] = {}
        for r in routes:
            if r.name in table:
                raise ValueError(f"route {r.name!r} appears twice")
            table[r.name] = r
        return cls(table)

    def with_route(self, route: Route) -> "RoutingTable":
        """A new table with `route` added or replacing the route of the same name."""
        routes = dict(self._routes)
        routes[route.name] = route
        return RoutingTable(routes)

    def without(self, name: str) -> "RoutingTable":
        if name not in self._routes:
            raise UnknownModel(name, self.names())
        return RoutingTable({k: v for k, v in self._routes.items() if k != name})

    def resolve(self, name: str) -> Route:
        """The route for `name`, or UnknownModel (404) listing the available names."""
        try:
            return self._routes[name]
        except (KeyError, TypeError):
            raise UnknownModel(name, self.names()) from None

    def get(self, name: str) -> Route | None:
        return self._routes.get(name)

    def names(self) -> tuple[str, ...]:
        return tuple(self._routes)

    def routes(self) -> tuple[Route, ...]:
        return tuple(self._routes.values())

    def using_upstream(self, upstream: str) -> tuple[Route, ...]:
        return tuple(r for r in self._routes.values() if r.upstream == upstream)

    def __iter__(self) -> Iterator[Route]:
        return iter(self._routes.values())

    def __len__(self) -> int:
        return len(self._routes)

    def __contains__(self, name: object) -> bool:
        return name in self._routes


def config_routes(config, base_upstream: str = "base") -> RoutingTable:
    """The static table a deployment file describes: the base model and every adapter on one base
    engine (registered as `base_upstream`), adapters under their own names."""
    routes = [Route(config.base.name, base_upstream, config.base.name, "base")]
    routes += [Route(a.name, base_upstream, a.name, "adapter") for a in config.adapters]
    return RoutingTable.of(routes)
