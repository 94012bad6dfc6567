"""Engine supervision: start, stop, and restart with backoff the engines a deployment runs.

An engine that exits without being asked is restarted on the same port (the gateway's upstream URL
stays valid) after `Backoff.delay(streak)`. Meanwhile the gateway marks its upstream down, so its routes
answer 503 with Retry-After, and /readyz names them. Blocking work (spawning, waiting for readiness)
runs in threads; the watch loop runs on the serve process's event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from deploy.core.backoff import Backoff
from deploy.engines import Engine, EngineError, EngineLaunch

log = logging.getLogger("switchyard.deploy")


@dataclass
class Managed:
    engine: Engine
    timeout_s: float
    started_at: float
    streak: int = 0
    restarts: int = 0
    stopping: bool = False
    restarting: bool = False
    last_exit: int | None = None
    restart_task: asyncio.Task | None = field(default=None, repr=False)


class Supervisor:
    """Owns engine processes by upstream name. `on_down(name)`, `on_up(name)` and `on_event(name, kind,
    detail)` let the serve process update the gateway and the registry."""

    def __init__(self, backoff: Backoff = Backoff(), clock: Callable[[], float] = time.monotonic,
                 on_down: Callable[[str, str], None] | None = None, on_up: Callable[[str], None] | None = None,
                 on_event: Callable[[str, str, dict], None] | None = None, poll_s: float = 0.5) -> None:
        self.backoff = backoff
        self.clock = clock
        self.on_down = on_down or (lambda name, why: None)
        self.on_up = on_up or (lambda name: None)
        self.on_event = on_event or (lambda name, kind, detail: None)
        self.poll_s = poll_s
        self._engines: dict[str, Managed] = {}

    def start(self, name: str, launch: EngineLaunch, timeout_s: float) -> Engine:
        """Blocking: start an engine and return once it generates (EngineError otherwise)."""
        engine = Engine(launch)
        log.info("engine %s: starting %s on port %d", name, launch.model, launch.port)
        t0 = time.monotonic()
        engine.start(timeout_s=timeout_s)
        log.info("engine %s: ready in %.1f s (pid %s)", name, time.monotonic() - t0, engine.pid)
        self._engines[name] = Managed(engine, timeout_s, self.clock())
        return engine

    def stop(self, name: str, grace_s: float = 15.0) -> None:
        """Blocking: stop an engine on purpose (no restart)."""
        managed = self._engines.pop(name, None)
        if managed is None:
            return
        managed.stopping = True
        if managed.restart_task is not None:
            managed.restart_task.cancel()
        code = managed.engine.stop(grace_s)
        log.info("engine %s: stopped (exit %s)", name, code)

    def stop_all(self, grace_s: float = 15.0) -> None:
        for name in list(self._engines):
            self.stop(name, grace_s)

    def engine(self, name: str) -> Engine | None:
        m = self._engines.get(name)
        return m.engine if m else None

    def snapshot(self) -> dict[str, dict]:
        return {
            name: {"pid": m.engine.pid, "port": m.engine.launch.port, "url": m.engine.url,
                   "model": str(m.engine.launch.model), "alive": m.engine.alive(), "restarts": m.restarts,
                   "restarting": m.restarting, "last_exit": m.last_exit}
            for name, m in self._engines.items()
        }

    async def watch(self) -> None:
        """Forever: notice engines that died and restart them with backoff."""
        while True:
            await asyncio.sleep(self.poll_s)
            for name, m in list(self._engines.items()):
                if m.stopping or m.restarting or m.engine.alive():
                    continue
                m.restarting = True
                m.last_exit = m.engine.process.returncode if m.engine.process else None
                m.streak = self.backoff.next_streak(m.streak, self.clock() - m.started_at)
                delay = self.backoff.delay(m.streak - 1)
                log.warning("engine %s: exited with code %s; restarting in %.1f s", name, m.last_exit, delay)
                self.on_down(name, f"engine exited with code {m.last_exit}")
                self.on_event(name, "engine-exit", {"exit_code": m.last_exit, "restart_in_s": delay})
                m.restart_task = asyncio.create_task(self._restart(name, m, delay))

    async def _restart(self, name: str, m: Managed, delay: float) -> None:
        await asyncio.sleep(delay)
        while not m.stopping:
            try:
                m.engine.stop(grace_s=1)  # reap the dead process group and close its log
                await asyncio.to_thread(m.engine.start, m.timeout_s)
            except EngineError as exc:
                m.streak += 1
                delay = self.backoff.delay(m.streak - 1)
                log.error("engine %s: restart failed (%s); next try in %.1f s", name, exc.problem.splitlines()[0], delay)
                await asyncio.sleep(delay)
                continue
            m.restarts += 1
            m.started_at = self.clock()
            m.restarting = False
            log.info("engine %s: restarted (pid %s)", name, m.engine.pid)
            self.on_up(name)
            self.on_event(name, "engine-restart", {"pid": m.engine.pid, "restarts": m.restarts})
            return
