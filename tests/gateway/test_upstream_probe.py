"""One probe at a time per upstream, and a caller arriving mid-probe gets that probe's answer."""

from __future__ import annotations

import asyncio

import gateway.upstream as upstream_mod
from gateway.upstream import Upstream, probe_and_record


def test_concurrent_callers_share_one_probe_and_its_answer(monkeypatch):
    calls = []

    async def fake_probe(session, up, timeout_s):
        calls.append(up.name)
        await asyncio.sleep(0.05)
        return True, None, False

    monkeypatch.setattr(upstream_mod, "probe", fake_probe)
    up = Upstream("merged-x", "http://127.0.0.1:9")
    assert up.state == "unknown"

    async def go():
        first = asyncio.create_task(probe_and_record(None, up, 1.0, 2))
        await asyncio.sleep(0.01)  # the first probe is in flight: the state is still "unknown"
        second = await probe_and_record(None, up, 1.0, 2)
        return await first, second, up._probe_task

    first, second, left = asyncio.run(go())
    assert (first, second) == (True, True) and calls == ["merged-x"] and up.state == "healthy"
    assert left is None  # the finished probe is cleared: the next call probes again


def test_a_cancelled_caller_does_not_cancel_the_shared_probe(monkeypatch):
    async def fake_probe(session, up, timeout_s):
        await asyncio.sleep(0.05)
        return False, "probe got HTTP 500", False

    monkeypatch.setattr(upstream_mod, "probe", fake_probe)
    up = Upstream("base", "http://127.0.0.1:9")

    async def go():
        impatient = asyncio.create_task(probe_and_record(None, up, 1.0, 1))
        await asyncio.sleep(0.01)
        impatient.cancel()
        return await probe_and_record(None, up, 1.0, 1)

    assert asyncio.run(go()) is False and up.state == "down" and up.last_error == "probe got HTTP 500"
