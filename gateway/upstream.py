"""One vLLM engine as the gateway sees it: its in-flight count, its health, its runtime adapters.

Health is judged by generation, not by `/health` (which can answer 200 for a hung engine): a probe
asks for one token. A refused connection marks the upstream down at once (the process is gone);
other failures (a slow probe on a busy engine) need `unhealthy_after` in a row.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import aiohttp

State = Literal["unknown", "healthy", "down"]
PROBE_HEADERS = {"x-switchyard-probe": "1"}  # lets engine logs (and test upstreams) tell probes apart


@dataclass(eq=False)
class Upstream:
    """Mutable state of one engine, touched only from the event loop (no locks needed)."""

    name: str
    url: str
    max_lora_rank: int | None = None
    base_model: Path | None = None  # checkpoint folder: adapter shapes are checked against it
    probe_model: str | None = None  # a served name to generate with; discovered from /v1/models if None
    state: State = "unknown"
    failures: int = 0
    last_error: str | None = None
    last_probe_at: float | None = None
    in_flight: int = 0
    adapters: set[str] = field(default_factory=set)  # loaded through this gateway at runtime
    loading: set[str] = field(default_factory=set)   # names reserved by a load in progress
    _idle: asyncio.Event | None = field(default=None, repr=False)
    _probe_task: asyncio.Future | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/")

    # --- in-flight counting (drain waits for zero) -------------------------------------------
    def enter(self) -> None:
        self.in_flight += 1
        if self._idle is not None:
            self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight <= 0 and self._idle is not None:
            self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        if self.in_flight <= 0:
            return True
        if self._idle is None:
            self._idle = asyncio.Event()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except asyncio.TimeoutError:
            return self.in_flight <= 0
        return True

    # --- health --------------------------------------------------------------------------------
    def record_probe(self, ok: bool, error: str | None, refused: bool, unhealthy_after: int, now: float) -> None:
        self.last_probe_at = now
        if ok:
            self.state, self.failures, self.last_error = "healthy", 0, None
            return
        self.failures += 1
        self.last_error = error
        if refused or self.failures >= unhealthy_after:
            self.state = "down"

    def mark_down(self, error: str) -> None:
        self.state, self.last_error = "down", error

    def snapshot(self) -> dict:
        return {
            "name": self.name, "url": self.url, "state": self.state, "healthy": self.state == "healthy",
            "in_flight": self.in_flight, "failures": self.failures, "last_error": self.last_error,
            "max_lora_rank": self.max_lora_rank, "runtime_adapters": sorted(self.adapters),
        }


async def discover_model(session: aiohttp.ClientSession, up: Upstream, timeout_s: float) -> str:
    """The engine's base served name: the first /v1/models entry that is not a LoRA."""
    async with session.get(f"{up.url}/v1/models", timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
        r.raise_for_status()
        data = (await r.json())["data"]
    for m in data:
        if not m.get("parent"):
            return m["id"]
    return data[0]["id"]


async def probe(session: aiohttp.ClientSession, up: Upstream, timeout_s: float) -> tuple[bool, str | None, bool]:
    """(generated one token, error, connection refused). Never raises."""
    try:
        model = up.probe_model or await discover_model(session, up, timeout_s)
        async with session.post(f"{up.url}/v1/completions", headers=PROBE_HEADERS,
                                json={"model": model, "prompt": "a", "max_tokens": 1},
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
            if r.status == 200 and (await r.json()).get("choices"):
                return True, None, False
            return False, f"probe got HTTP {r.status}", False
    except aiohttp.ClientConnectorError as exc:
        return False, f"connection refused ({exc.os_error})", True
    except (asyncio.TimeoutError, TimeoutError):
        return False, f"no token within {timeout_s:g} s", False
    except (aiohttp.ClientError, ValueError, KeyError, IndexError) as exc:
        return False, f"probe failed: {type(exc).__name__}: {exc}", False


async def probe_and_record(session: aiohttp.ClientSession, up: Upstream, timeout_s: float, unhealthy_after: int) -> bool:
    """Probe `up` and record the result. One probe at a time per upstream: a caller arriving while one
    is in flight waits for that probe's answer (not the state from before it: a just-started engine
    is "unknown" until its first probe lands, and a promote asking then must not read that as down)."""
    if up._probe_task is None:
        async def run() -> bool:
            ok, error, refused = await probe(session, up, timeout_s)
            up.record_probe(ok, error, refused, unhealthy_after, time.monotonic())
            return ok

        task = asyncio.ensure_future(run())
        up._probe_task = task
        task.add_done_callback(lambda t: setattr(up, "_probe_task", None) if up._probe_task is t else None)
    # shielded: one caller giving up (cancelled) does not cancel the probe the others wait on
    return await asyncio.shield(up._probe_task)
