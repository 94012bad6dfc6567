"""Which routes and engines a deployment has, from its config and its registry: pure.

Names: the base engine is upstream `base`; an adapter's LoRA name on it is its stable name; the merged
engine of route R is upstream `merged-R`, serving the model under the name `R-merged` (so the gateway's
model rewriting is always exercised, and engine logs say which is which).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gateway.core.routing import Route
from switchyard.config import DeploymentConfig

BASE_UPSTREAM = "base"


def merged_upstream(route: str) -> str:
    return f"merged-{route}"


def merged_served_name(route: str) -> str:
    return f"{route}-merged"


def adapter_route(name: str) -> Route:
    return Route(name, BASE_UPSTREAM, name, "adapter")


def merged_route(name: str) -> Route:
    return Route(name, merged_upstream(name), merged_served_name(name), "merged")


@dataclass(frozen=True)
class MergedEngineWanted:
    route: str
    model: Path


def initial_routes(config: DeploymentConfig, merged: dict[str, Path]) -> tuple[list[Route], list[MergedEngineWanted]]:
    """Routes at start-up: the base, each adapter on the base engine, except the routes the registry
    records as merged (`merged`: route -> artifact folder) whose artifact still exists."""
    routes = [Route(config.base.name, BASE_UPSTREAM, config.base.name, "base")]
    engines: list[MergedEngineWanted] = []
    for spec in config.adapters:
        artifact = merged.get(spec.name)
        if artifact is not None and (artifact / "config.json").is_file():
            routes.append(merged_route(spec.name))
            engines.append(MergedEngineWanted(spec.name, artifact))
        else:
            routes.append(adapter_route(spec.name))
    return routes, engines
