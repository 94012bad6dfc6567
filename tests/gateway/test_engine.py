"""The gateway in front of the session's real vLLM engine (`base_engine`), through the official
openai client. The engine-kill test runs last: it restarts the shared engine and leaves it running."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import openai
import pytest

from deploy.engines import free_port
from gateway.app import create_app
from gateway.canned import ServerThread
from gateway.core.routing import config_routes
from gateway.server import GatewayProtocol
from gateway.service import Gateway
from gateway.settings import load_settings
from tests.gateway.conftest import ADMIN_KEY, CLIENT_KEY, auth

pytestmark = pytest.mark.engine
ADMIN = auth(ADMIN_KEY)


@pytest.fixture(scope="module")
def gw_server(base_engine, demo_config, demo_dir):
    root = demo_config.gateway.adapters_root or demo_dir / "adapters"
    s = load_settings(demo_config, api_keys=CLIENT_KEY, admin_key=ADMIN_KEY, adapters_root=root, port=0,
                      health_interval_s=1.0, down_probe_interval_s=0.5, probe_timeout_s=15, connect_retries=1)
    gw = Gateway(s)
    gw.add_upstream("base", base_engine.url, max_lora_rank=demo_config.engine.max_lora_rank,
                    base_model=demo_config.base.model, probe_model=demo_config.base.name)
    gw.replace_table(config_routes(demo_config, "base"))
    with ServerThread(create_app(s, gw), free_port(), timeout_keep_alive=s.client_keepalive_s,
                      http=GatewayProtocol) as server:
        server.gateway, server.config, server.engine, server.root = gw, demo_config, base_engine, root
        yield server


def oai(server, timeout: float = 120) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=timeout)


def direct(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.engine.url + "/v1", api_key="none", max_retries=0, timeout=120)


def names(server) -> list[str]:
    return [server.config.base.name, *(a.name for a in server.config.adapters)]


MSG = [{"role": "user", "content": "abcde"}]


def test_models_lists_base_and_adapters(gw_server):
    models = {m.id: m.mode for m in oai(gw_server).models.list().data}
    assert models == {n: ("base" if n == gw_server.config.base.name else "adapter") for n in names(gw_server)}


def test_chat_and_completions_on_every_route_match_the_engine(gw_server):
    for name in names(gw_server):
        got = oai(gw_server).chat.completions.with_raw_response.create(model=name, messages=MSG, max_tokens=8,
                                                                      temperature=0)
        assert got.headers["x-switchyard-mode"] in ("base", "adapter")
        chat = got.parse()
        want = direct(gw_server).chat.completions.create(model=name, messages=MSG, max_tokens=8, temperature=0)
        assert chat.model == name and chat.choices[0].message.content == want.choices[0].message.content
        comp = oai(gw_server).completions.create(model=name, prompt="abc", max_tokens=8, temperature=0)
        want = direct(gw_server).completions.create(model=name, prompt="abc", max_tokens=8, temperature=0)
        assert comp.model == name and comp.choices[0].text == want.choices[0].text
        assert comp.usage.completion_tokens == want.usage.completion_tokens


def test_streaming_matches_the_whole_answer(gw_server):
    name = gw_server.config.adapters[0].name
    whole = oai(gw_server).chat.completions.create(model=name, messages=MSG, max_tokens=16, temperature=0)
    chunks = list(oai(gw_server).chat.completions.create(model=name, messages=MSG, max_tokens=16, temperature=0,
                                                         stream=True))
    assert {c.model for c in chunks} == {name} and all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    with_usage = list(oai(gw_server).completions.create(model=name, prompt="abc", max_tokens=5, stream=True,
                                                        stream_options={"include_usage": True},
                                                        extra_body={"ignore_eos": True}))
    assert with_usage[-1].usage.completion_tokens == 5
    metrics = httpx.get(gw_server.url + "/metrics").text
    assert f'switchyard_completion_tokens_total{{mode="adapter",route="{name}"}}' in metrics
    assert f'switchyard_requests_total{{mode="adapter",route="{name}",status="200"}}' in metrics
    assert f'route="{name}",status="499"' not in metrics  # finished streams are not counted as abandoned


def test_errors_and_keys(gw_server):
    with pytest.raises(openai.NotFoundError, match=gw_server.config.base.name):
        oai(gw_server).chat.completions.create(model="no-such-model", messages=MSG)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=gw_server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(gw_server.url + "/admin/routes", headers=auth(CLIENT_KEY)).status_code == 403
    assert httpx.get(gw_server.url + "/admin/routes").status_code == 401
    with pytest.raises(openai.BadRequestError):  # the engine's own 400 passes through
        oai(gw_server).completions.create(model=gw_server.config.base.name, prompt="x", max_tokens=100_000)
    ready = httpx.get(gw_server.url + "/readyz")
    assert ready.status_code == 200, ready.text


def test_route_switch_while_streams_are_in_flight(gw_server):
    a, b = gw_server.config.adapters[0].name, gw_server.config.adapters[1].name
    results: dict[int, tuple[str, int]] = {}

    def stream(i):
        s = oai(gw_server).completions.create(model=a, prompt="abc", max_tokens=48, stream=True,
                                              extra_body={"ignore_eos": True})
        chunks = list(s)
        results[i] = (chunks[-1].choices[0].finish_reason, len(chunks))

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while gw_server.gateway.in_flight("base") < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    r = httpx.put(gw_server.url + f"/admin/routes/{a}", headers=ADMIN,
                  json={"upstream": "base", "upstream_model": b, "mode": "adapter"})
    assert r.status_code == 200
    try:
        for t in threads:
            t.join(120)
        assert results == {i: ("length", 48) for i in range(4)}  # none lost, none cut short
        now = oai(gw_server).completions.create(model=a, prompt="abc", max_tokens=8, temperature=0)
        want = direct(gw_server).completions.create(model=b, prompt="abc", max_tokens=8, temperature=0)
        assert now.model == a and now.choices[0].text == want.choices[0].text  # served by b now
    finally:
        httpx.put(gw_server.url + f"/admin/routes/{a}", headers=ADMIN,
                  json={"upstream": "base", "upstream_model": a, "mode": "adapter"})


def test_runtime_adapter_load_checks_first_then_serves(gw_server, tmp_path):
    cfg = gw_server.config
    if cfg.engine.max_loras < len(cfg.adapters) + 1:
        pytest.skip("the shared engine has no free LoRA slot")
    r = httpx.post(gw_server.url + "/admin/adapters", headers=ADMIN,
                   json={"upstream": "base", "name": "sneaky", "path": str(tmp_path)})
    assert r.status_code == 422 and "outside the adapters root" in r.json()["error"]["message"]
    source = cfg.adapters[0]
    r = httpx.post(gw_server.url + "/admin/adapters", headers=ADMIN,
                   json={"upstream": "base", "name": "rt-copy", "path": str(source.path), "route": "rt-bot"})
    assert r.status_code == 200, r.text
    try:
        engine_models = [m.id for m in direct(gw_server).models.list().data]
        assert "rt-copy" in engine_models and "sneaky" not in engine_models
        got = oai(gw_server).completions.create(model="rt-bot", prompt="abc", max_tokens=8, temperature=0)
        want = direct(gw_server).completions.create(model=source.name, prompt="abc", max_tokens=8, temperature=0)
        assert got.choices[0].text == want.choices[0].text  # same weights, same answer
        again = httpx.post(gw_server.url + "/admin/adapters", headers=ADMIN,
                           json={"upstream": "base", "name": "rt-copy", "path": str(source.path)})
        assert again.status_code == 409
    finally:
        httpx.delete(gw_server.url + "/admin/routes/rt-bot", headers=ADMIN)
        assert httpx.delete(gw_server.url + "/admin/adapters/base/rt-copy", headers=ADMIN).status_code == 200
    assert "rt-copy" not in [m.id for m in direct(gw_server).models.list().data]


def test_engine_killed_mid_request_then_recovers(gw_server):
    """Runs last. SIGKILLs the shared engine while a stream and a plain request are in flight, checks
    the clean errors and /readyz, restarts the engine on the same port and waits for recovery."""
    engine, base = gw_server.engine, gw_server.config.base.name
    max_tokens = max(16, gw_server.config.engine.max_model_len - 32)
    # the demo model is tiny: many sequences per request keep both requests at the engine long enough
    long = {"ignore_eos": True, "n": 64}
    outcome: dict[str, object] = {}

    def plain():
        try:
            oai(gw_server).completions.create(model=base, prompt="a", max_tokens=max_tokens, extra_body=long)
            outcome["plain"] = "completed"
        except openai.APIStatusError as exc:
            outcome["plain"] = exc.status_code

    def waited_for(n: int) -> int:
        deadline = time.monotonic() + 30
        while gw_server.gateway.in_flight("base") < n and time.monotonic() < deadline:
            time.sleep(0.005)
        return gw_server.gateway.in_flight("base")

    # the plain request first: the gateway holds it until the engine has finished all of it, so the
    # stream opened next overlaps it for that whole time (opened first, a stream of the tiny model
    # could end before the thread's request arrived, and once in a CI run did)
    client = oai(gw_server)
    worker = threading.Thread(target=plain)
    worker.start()
    assert waited_for(1) == 1
    stream = client.completions.create(model=base, prompt="a", max_tokens=max_tokens, stream=True, extra_body=long)
    got = [next(iter(stream))]
    assert waited_for(2) == 2  # both requests are at the engine
    os.killpg(engine.process.pid, signal.SIGKILL)
    try:
        with pytest.raises(openai.APIError, match="incomplete"):
            for chunk in stream:
                got.append(chunk)
        assert len(got) < max_tokens * long["n"]
        worker.join(60)
        assert outcome["plain"] == 503
        deadline = time.monotonic() + 20
        while httpx.get(gw_server.url + "/readyz").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        ready = httpx.get(gw_server.url + "/readyz")
        assert ready.status_code == 503 and base in ready.json()["error"]["message"]
        with pytest.raises(openai.APIStatusError) as exc:
            oai(gw_server).completions.create(model=base, prompt="a", max_tokens=2)
        assert exc.value.status_code == 503 and int(exc.value.response.headers["retry-after"]) >= 1
        ups = httpx.get(gw_server.url + "/admin/upstreams", headers=ADMIN).json()["upstreams"]
        assert ups[0]["healthy"] is False and ups[0]["in_flight"] == 0
    finally:
        engine.stop()
        engine.start(timeout_s=gw_server.config.engine.start_timeout_s)  # leave it running for others
    deadline = time.monotonic() + 30
    while httpx.get(gw_server.url + "/readyz").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert httpx.get(gw_server.url + "/readyz").status_code == 200
    again = oai(gw_server).completions.create(model=base, prompt="a", max_tokens=2)
    assert again.model == base and again.choices[0].text is not None
