"""The admin API (`/admin/...`, admin key only): routes, upstream health and in-flight counts,
runtime adapter loads. A thin HTTP face over `Gateway`; every rule lives there or in core."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from gateway.auth import gateway_of, require_admin
from gateway.core.routing import Route
from gateway.service import Gateway

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)])

_NAME = Field(min_length=1, max_length=256)


class RouteBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    upstream: str = _NAME
    upstream_model: str = _NAME
    mode: Literal["base", "adapter", "merged"]


class AdapterLoad(BaseModel):
    model_config = ConfigDict(extra="forbid")
    upstream: str = _NAME
    name: str = Field(min_length=1, max_length=128, description="the LoRA name on the engine")
    path: str = Field(min_length=1, max_length=4096, description="a folder under the adapters root")
    route: str | None = Field(None, min_length=1, max_length=256,
                              description="also route this stable name to the adapter once loaded")


def _route_json(r: Route) -> dict:
    return {"name": r.name, "upstream": r.upstream, "upstream_model": r.upstream_model, "mode": r.mode}


@router.get("/routes")
async def list_routes(gw: Gateway = Depends(gateway_of)) -> dict:
    return {"routes": [_route_json(r) for r in gw.table]}


@router.put("/routes/{name}")
async def switch_route(name: str, body: RouteBody, gw: Gateway = Depends(gateway_of)) -> dict:
    """Add or switch a route atomically; requests already running keep their old route."""
    route = Route(name, body.upstream, body.upstream_model, body.mode)
    gw.set_route(route)
    return _route_json(route)


@router.delete("/routes/{name}")
async def delete_route(name: str, gw: Gateway = Depends(gateway_of)) -> dict:
    gw.remove_route(name)
    return {"deleted": name}


@router.get("/upstreams")
async def list_upstreams(gw: Gateway = Depends(gateway_of)) -> dict:
    return {"upstreams": [u.snapshot() for u in gw.upstreams()]}


@router.post("/health")
async def probe_now(gw: Gateway = Depends(gateway_of)) -> dict:
    """Probe every upstream now (each must generate one token)."""
    return {"healthy": await gw.check_health()}


@router.post("/adapters")
async def load_adapter(body: AdapterLoad, gw: Gateway = Depends(gateway_of)) -> dict:
    """Check the folder, then load it on the engine; 422 names what failed, 409 for a duplicate name."""
    summary = await gw.load_adapter(body.upstream, body.name, body.path)
    result = {"loaded": body.name, "upstream": body.upstream, "rank": summary.rank, "modules": list(summary.modules)}
    if body.route:
        route = Route(body.route, body.upstream, body.name, "adapter")
        gw.set_route(route)
        result["route"] = _route_json(route)
    return result


@router.delete("/adapters/{upstream}/{name}")
async def unload_adapter(upstream: str, name: str, gw: Gateway = Depends(gateway_of)) -> dict:
    await gw.unload_adapter(upstream, name)
    return {"unloaded": name, "upstream": upstream}
