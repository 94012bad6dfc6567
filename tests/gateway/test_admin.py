"""Admin API and the Gateway's Python API against a canned upstream: routes, adapter loads (checked
before the engine sees them), concurrency, drain."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from gateway.core.errors import Conflict, NotFound
from gateway.core.routing import Route
from gateway.service import Gateway
from gateway.settings import load_settings
from gateway.upstream import Upstream
from tests.gateway.conftest import ADMIN_KEY, auth, serve_gateway
from tests.gateway.tiny import write_adapter, write_base

ADMIN = auth(ADMIN_KEY)


@pytest.fixture()
def adapter_gateway(tmp_path, fresh_canned):
    root = tmp_path / "adapters"
    write_adapter(root / "good", r=4)
    write_adapter(tmp_path / "outside", r=4)
    with serve_gateway(fresh_canned.url, base_model=write_base(tmp_path / "base"), adapters_root=root) as server:
        server.root, server.tmp = root, tmp_path
        yield server


def loads(canned) -> list[dict]:
    return [json.loads(r.body) for r in canned.served() if r.path == "/v1/load_lora_adapter"]


def test_load_route_and_unload_an_adapter(adapter_gateway, fresh_canned):
    url = adapter_gateway.url
    r = httpx.post(url + "/admin/adapters", headers=ADMIN, json={"upstream": "base", "name": "good-1",
                                                                 "path": "good", "route": "good-bot"})
    assert r.status_code == 200, r.text
    assert r.json()["rank"] == 4 and r.json()["route"]["mode"] == "adapter"
    assert loads(fresh_canned) == [{"lora_name": "good-1", "lora_path": str((adapter_gateway.root / "good").resolve())}]
    models = httpx.get(url + "/v1/models", headers=auth()).json()["data"]
    assert {"id": "good-bot", "mode": "adapter", "upstream": "base"}.items() <= models[-1].items()
    ups = httpx.get(url + "/admin/upstreams", headers=ADMIN).json()["upstreams"]
    assert ups[0]["runtime_adapters"] == ["good-1"] and ups[0]["healthy"]
    # an adapter a route still uses is not unloaded under it
    assert httpx.delete(url + "/admin/adapters/base/good-1", headers=ADMIN).status_code == 409
    assert httpx.delete(url + "/admin/routes/good-bot", headers=ADMIN).status_code == 200
    assert httpx.delete(url + "/admin/adapters/base/good-1", headers=ADMIN).status_code == 200
    assert fresh_canned.loaded == set()
    assert httpx.delete(url + "/admin/adapters/base/good-1", headers=ADMIN).status_code == 404


def test_paths_outside_the_root_are_refused_before_the_engine_sees_them(adapter_gateway, fresh_canned):
    for path in (str(adapter_gateway.tmp / "outside"), "../outside", "/etc", "good/../../outside"):
        r = httpx.post(adapter_gateway.url + "/admin/adapters", headers=ADMIN,
                       json={"upstream": "base", "name": "x", "path": path})
        assert r.status_code == 422 and "outside the adapters root" in r.json()["error"]["message"], path
    assert loads(fresh_canned) == []


def test_duplicate_names_get_409_and_concurrent_loads_load_once(adapter_gateway, fresh_canned):
    body = {"upstream": "base", "name": "dup", "path": "good"}

    def post(_):
        return httpx.post(adapter_gateway.url + "/admin/adapters", headers=ADMIN, json=body).status_code

    with ThreadPoolExecutor(6) as pool:
        codes = sorted(pool.map(post, range(6)))
    assert codes == [200] + [409] * 5
    assert len(loads(fresh_canned)) == 1
    assert post(0) == 409
    fresh_canned.loaded.add("preloaded")  # loaded at engine start, unknown to the gateway: vLLM says so
    r = httpx.post(adapter_gateway.url + "/admin/adapters", headers=ADMIN, json={**body, "name": "preloaded"})
    assert r.status_code == 409


def test_route_admin_validates(adapter_gateway):
    url = adapter_gateway.url + "/admin/routes/new"
    assert httpx.put(url, headers=ADMIN, json={"upstream": "nowhere", "upstream_model": "m", "mode": "merged"}
                     ).status_code == 404
    assert httpx.put(url, headers=ADMIN, json={"upstream": "base", "upstream_model": "m", "mode": "weird"}
                     ).status_code == 400
    assert httpx.put(url, headers=ADMIN, json={"upstream": "base"}).status_code == 400
    assert httpx.delete(adapter_gateway.url + "/admin/routes/absent", headers=ADMIN).status_code == 404


def test_gateway_api_registry_rules():
    gw = Gateway(load_settings())
    gw.add_upstream("base", "http://127.0.0.1:1")
    gw.add_upstream("merged-1", "http://127.0.0.1:2")
    with pytest.raises(Conflict):
        gw.add_upstream("base", "http://x")
    gw.set_route(Route("bot", "merged-1", "bot", "merged"))
    with pytest.raises(Conflict, match="switch them first"):
        gw.remove_upstream("merged-1")
    with pytest.raises(NotFound):
        gw.set_route(Route("bot", "ghost", "bot", "merged"))
    gw.set_route(Route("bot", "base", "bot-lora", "adapter"))
    gw.remove_upstream("merged-1")
    assert [u.name for u in gw.upstreams()] == ["base"] and gw.table.resolve("bot").upstream == "base"


def test_drain_waits_for_in_flight_to_reach_zero():
    async def scenario():
        up = Upstream("u", "http://x")
        up.enter()
        up.enter()
        assert not await up.wait_idle(0.05)  # two in flight: times out
        waiter = asyncio.ensure_future(up.wait_idle(2))
        up.leave()
        await asyncio.sleep(0.01)
        assert not waiter.done()
        up.leave()
        assert await waiter and up.in_flight == 0
        assert await up.wait_idle(0)  # idle already

    asyncio.run(scenario())


def test_admin_loads_are_refused_without_an_adapters_root(tmp_path, fresh_canned):
    write_adapter(tmp_path / "a")
    with serve_gateway(fresh_canned.url, base_model=write_base(tmp_path / "base")) as server:
        r = httpx.post(server.url + "/admin/adapters", headers=ADMIN,
                       json={"upstream": "base", "name": "a", "path": str(tmp_path / "a")})
        assert r.status_code == 422 and "no adapters root" in r.json()["error"]["message"]
    assert loads(fresh_canned) == []
