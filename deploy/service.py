"""`Deployment`: the serve process's state — engines, gateway routes, registry — and the operations
on it (start, promote, rollback, status, shutdown). The HTTP face is deploy.admin; the CLI is deploy.cli.

All methods run on the serve process's event loop; blocking work (engine starts, merges, quantization,
validation) runs in threads, so the gateway keeps serving while a promote runs.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import psutil

from deploy.core.promotion import PromoteJob, Status, plan_promote
from deploy.core.routes import BASE_UPSTREAM, adapter_route, initial_routes, merged_upstream
from deploy.engines import EngineLaunch, free_port
from deploy.errors import DeployError, RollbackError
from deploy.registry import Registry
from deploy.supervisor import Supervisor
from gateway.core.errors import Conflict
from gateway.core.routing import RoutingTable
from gateway.service import Gateway
from switchyard.config import DeploymentConfig

log = logging.getLogger("switchyard.deploy")


class Deployment:
    def __init__(self, config: DeploymentConfig, registry: Registry, gateway: Gateway,
                 supervisor: Supervisor | None = None, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.registry = registry
        self.gateway = gateway
        self.clock = clock
        self.supervisor = supervisor or Supervisor(on_down=self._engine_down, on_up=self._engine_up,
                                                   on_event=self._engine_event)
        self.jobs: dict[str, PromoteJob] = {}
        self._job_tasks: dict[str, asyncio.Task] = {}
        self._busy_routes: set[str] = set()
        self._watch_task: asyncio.Task | None = None

    @property
    def state_dir(self) -> Path:
        return self.config.gateway.state_dir

    # --- engines --------------------------------------------------------------------------------
    def base_launch(self, port: int | None = None) -> EngineLaunch:
        c = self.config
        port = port or free_port()
        return EngineLaunch(
            model=c.base.model, served_name=c.base.name, port=port, enable_lora=True,
            max_lora_rank=c.engine.max_lora_rank, max_loras=c.engine.max_loras,
            lora_modules=tuple((a.name, a.path) for a in c.adapters),
            max_model_len=c.engine.max_model_len, kv_cache_gib=c.engine.kv_cache_gib, dtype=c.engine.dtype,
            extra_args=c.engine.extra_args, log_path=self.state_dir / "logs" / f"engine-base-{port}.log",
        )

    def merged_launch(self, route: str, model: Path) -> EngineLaunch:
        from deploy.core.routes import merged_served_name

        c = self.config
        port = free_port()
        return EngineLaunch(
            model=model, served_name=merged_served_name(route), port=port,
            max_model_len=c.engine.max_model_len, kv_cache_gib=c.engine.kv_cache_gib, dtype=c.engine.dtype,
            extra_args=c.engine.extra_args, log_path=self.state_dir / "logs" / f"engine-{route}-{port}.log",
        )

    def _engine_down(self, name: str, why: str) -> None:
        try:
            self.gateway.upstream(name).mark_down(why)
        except Exception:  # an upstream removed meanwhile has nothing to mark
            pass

    def _engine_up(self, name: str) -> None:
        async def probe() -> None:
            await self.gateway.check_health()

        asyncio.get_running_loop().create_task(probe())

    def _engine_event(self, name: str, kind: str, detail: dict) -> None:
        self.registry.record_event(name, kind, actor="supervisor", detail=detail)

    # --- lifecycle ------------------------------------------------------------------------------
    def start_engines(self) -> None:
        """Blocking, before the gateway serves: the base engine (adapters preloaded), then the merged
        engines the registry says are live, then the routing table."""
        c = self.config
        check_model_folder(c.base.model, f"base.model in {c.source}")
        for spec in c.adapters:
            for path, what in ((spec.path / "adapter_config.json", "adapter_config.json"),):
                if not path.is_file():
                    raise DeployError(f"adapter {spec.name}: {path} not found",
                                      f"fix adapters.path for {spec.name} in {c.source}")
        merged = {d.route: d.artifact.path for d in self.registry.deployments()
                  if d.mode == "merged" and d.artifact is not None}
        routes, wanted = initial_routes(c, merged)
        base = self.supervisor.start(BASE_UPSTREAM, self.base_launch(), c.engine.start_timeout_s)
        self.gateway.add_upstream(BASE_UPSTREAM, base.url, max_lora_rank=c.engine.max_lora_rank,
                                  base_model=c.base.model, probe_model=c.base.name)
        for w in wanted:
            eng = self.supervisor.start(merged_upstream(w.route), self.merged_launch(w.route, w.model),
                                        c.engine.start_timeout_s)
            self.gateway.add_upstream(merged_upstream(w.route), eng.url, probe_model=eng.launch.served_name)
            log.info("route %s: restored as merged (%s)", w.route, w.model)
        self.gateway.replace_table(RoutingTable.of(routes))
        for r in routes:
            if self.registry.deployment(r.name) is None:
                self.registry.set_deployment(r.name, r.mode, artifact=None, actor="serve", event="register")

    async def run_background(self) -> None:
        self._watch_task = asyncio.create_task(self.supervisor.watch(), name="switchyard-supervisor")

    async def shutdown(self) -> None:
        """Abandon running promotes (each cleans up after itself), then stop every engine."""
        for job_id, task in list(self._job_tasks.items()):
            if not task.done():
                log.warning("promote %s: abandoned, serve is shutting down", job_id)
                task.cancel()
        if self._job_tasks:
            await asyncio.gather(*self._job_tasks.values(), return_exceptions=True)
        if self._watch_task is not None:
            self._watch_task.cancel()
        await asyncio.to_thread(self.supervisor.stop_all)
        _kill_children()

    # --- promote --------------------------------------------------------------------------------
    def start_promote(self, route: str, *, quantize: str, dry_run: bool, actor: str,
                      gates: dict | None = None) -> PromoteJob:
        """Create the job and run it in the background; 409 if this route is already being changed."""
        from deploy.promote import Promotion

        spec = self.config.adapter(route)
        if route in self._busy_routes:
            raise Conflict(f"a promote or rollback of {route!r} is already running", "wait for it to finish")
        current = self.gateway.table.get(route)
        if current is not None and current.mode == "merged" and not dry_run:
            raise Conflict(f"{route!r} is already served merged", f"`switchyard rollback {route}` first")
        quantize, note = resolve_quantize(quantize)
        promotion = Promotion(self, spec, quantize=quantize, dry_run=dry_run, actor=actor, gates=gates or {},
                              note=note)
        job = PromoteJob(uuid.uuid4().hex[:12], route, plan_promote(
            quantize=quantize != "none", reuse_artifact=promotion.reusable is not None, dry_run=dry_run),
            self.clock())
        self.jobs[job.id] = job
        self._busy_routes.add(route)

        async def run() -> None:
            try:
                await promotion.run(job.id)
            finally:
                self._busy_routes.discard(route)

        self._job_tasks[job.id] = asyncio.create_task(run(), name=f"promote-{job.id}")
        return job

    def update_job(self, job: PromoteJob) -> None:
        self.jobs[job.id] = job

    # --- rollback -------------------------------------------------------------------------------
    async def rollback(self, route: str, *, actor: str) -> dict:
        """Route back to the adapter on the base engine, then drain and stop the merged engine."""
        spec = self.config.adapter(route)
        current = self.gateway.table.get(route)
        if current is None or current.mode != "merged":
            mode = current.mode if current else "not routed"
            raise RollbackError(f"{route!r} is not served merged (it is {mode})", "nothing to roll back")
        if route in self._busy_routes:
            raise Conflict(f"a promote or rollback of {route!r} is already running", "wait for it to finish")
        self._busy_routes.add(route)
        t0 = time.monotonic()
        try:
            try:
                await self.gateway.load_adapter(BASE_UPSTREAM, route, spec.path)
            except Conflict:
                pass  # still loaded (keep_adapter_loaded): rollback is a route switch
            old = current.upstream
            self.gateway.set_route(adapter_route(route))
            switched_s = time.monotonic() - t0
            self.registry.set_deployment(route, "adapter", artifact=None, actor=actor, event="rollback",
                                         detail={"switched_in_s": round(switched_s, 3), "from": old})
            log.info("route %s: rolled back to the adapter in %.3f s", route, switched_s)
        finally:
            self._busy_routes.discard(route)
        asyncio.create_task(self.retire(old))
        return {"route": route, "mode": "adapter", "switched_in_s": round(switched_s, 3), "retiring": old}

    async def retire(self, upstream: str) -> None:
        """Drain an upstream no route uses any more, then stop its engine."""
        drained = await self.gateway.drain(upstream, self.config.deploy.drain_timeout_s)
        if not drained:
            log.warning("upstream %s: %d requests still in flight after the drain timeout",
                        upstream, self.gateway.in_flight(upstream))
        try:
            self.gateway.remove_upstream(upstream)
        except Exception as exc:  # a new promote may have routed to it again
            log.warning("upstream %s: not removed (%s)", upstream, exc)
            return
        await asyncio.to_thread(self.supervisor.stop, upstream)

    # --- status ---------------------------------------------------------------------------------
    def status(self) -> dict:
        engines = self.supervisor.snapshot()
        ups = {u.name: u.snapshot() for u in self.gateway.upstreams()}
        routes = []
        for r in self.gateway.table:
            dep = self.registry.deployment(r.name)
            routes.append({"name": r.name, "mode": r.mode, "upstream": r.upstream, "upstream_model": r.upstream_model,
                           "artifact": str(dep.artifact.path) if dep and dep.artifact else None})
        for name, snap in engines.items():
            snap.update({k: ups.get(name, {}).get(k) for k in ("state", "in_flight", "last_error")})
        return {"routes": routes, "engines": engines,
                "jobs": [j.to_dict() for j in self.jobs.values() if j.status is Status.RUNNING],
                "artifacts_in_use": sorted(str(p) for p in self.registry.artifacts_in_use())}


def resolve_quantize(choice: str) -> tuple[str, str | None]:
    """awq or none for this machine; `auto` picks awq only where the local vLLM can serve 4-bit.
    Returns the choice and, when auto fell back, why."""
    if choice != "auto":
        return choice, None
    from merger.quantize import quantized_serving_problem

    problem = quantized_serving_problem()
    return ("none", f"auto: serving merged full precision, since {problem}") if problem else ("awq", None)


def check_model_folder(folder: Path, where: str) -> None:
    """Refuse a model folder vLLM would fail on, before spending a minute starting an engine."""
    if not folder.is_dir():
        raise DeployError(f"model folder {folder} does not exist", f"fix {where}")
    if not (folder / "config.json").is_file():
        raise DeployError(f"{folder} has no config.json: not a Hugging Face checkpoint", f"fix {where}")
    if not any(folder.glob("*.safetensors")):
        bins = sorted(p.name for p in folder.glob("*.bin"))
        hint = (f"it has {', '.join(bins)}: convert to safetensors (pickles can run code)" if bins
                else f"point {where} at a folder with model weights")
        raise DeployError(f"{folder} has no .safetensors weights", hint)


def _kill_children() -> None:
    """Anything we started that is still running (a quantize worker mid-job) goes with us."""
    for child in psutil.Process().children(recursive=True):
        try:
            child.kill()
        except psutil.Error:
            pass
