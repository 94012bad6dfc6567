"""One promote, step by step: check, merge, quantize, validate (the gate), start, switch, drain, record.

Every step either completes or raises; on any failure (or cancellation, when serve shuts down) the
routes are left as they were (switched back if the switch had happened), any engine this promote
started is stopped, staged artifacts are removed, and the failure is recorded with its reason.
The adapter's files are only ever read.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from deploy.artifacts import fingerprint, publish, remove_unused, tree_sha256
from deploy.core.promotion import Step
from deploy.core.routes import BASE_UPSTREAM, adapter_route, merged_route, merged_upstream
from deploy.errors import PromoteError
from switchyard.config import AdapterSpec
from switchyard.errors import SwitchyardError

if TYPE_CHECKING:
    from deploy.service import Deployment

log = logging.getLogger("switchyard.deploy")


class Promotion:
    def __init__(self, dep: "Deployment", spec: AdapterSpec, *, quantize: str, dry_run: bool, actor: str,
                 gates: dict, note: str | None = None) -> None:
        self.dep, self.spec, self.quantize, self.dry_run, self.actor = dep, spec, quantize, dry_run, actor
        self.note = note
        cfg = dep.config
        self.max_kl = float(gates.get("max_kl", cfg.gates.max_kl))
        self.max_drop = float(gates.get("max_accuracy_drop", cfg.gates.max_accuracy_drop))
        self.options = {"quantize": quantize, "scheme": "W4A16" if quantize == "awq" else None, "dtype": "auto"}
        self.fingerprint = fingerprint(cfg.base.model, spec.path, self.options)
        self.reusable = dep.registry.find_artifact(self.fingerprint)
        self.staging: Path | None = None
        self.artifact: Path | None = self.reusable.path if self.reusable else None
        self.published = False
        self.started_engine = False
        self.switched = False
        self.report: dict = {}

    # --- the job driver -------------------------------------------------------------------------
    async def run(self, job_id: str) -> None:
        dep = self.dep
        steps = {Step.CHECK: self.check, Step.MERGE: self.merge, Step.QUANTIZE: self.quantize_step,
                 Step.VALIDATE: self.validate, Step.START: self.start, Step.SWITCH: self.switch,
                 Step.DRAIN: self.drain, Step.RECORD: self.record}
        job = dep.jobs[job_id]
        log.info("promote %s (%s): plan %s", self.spec.name, job_id, " → ".join(s.value for s in job.plan))
        try:
            while (step := job.next_step()) is not None:
                job = job.begin(step, dep.clock())
                dep.update_job(job)
                detail = await steps[step]() or {}
                job = job.complete(dep.clock(), **detail)
                dep.update_job(job)
                log.info("promote %s: %s done", self.spec.name, step.value)
        except asyncio.CancelledError:
            await self.undo()
            job = job.fail("abandoned: serve is shutting down", dep.clock())  # the failed job: it names the step
            dep.update_job(job)
            self._record_failure(job, "abandoned: serve is shutting down")
            raise
        except Exception as exc:  # every failure ends the job the same way, whatever raised it
            reason = exc.one_line() if isinstance(exc, SwitchyardError) else f"{type(exc).__name__}: {exc}"
            log.error("promote %s: failed at %s: %s", self.spec.name, job.current.value if job.current else "?", reason)
            await self.undo()
            job = job.fail(reason, dep.clock())
            dep.update_job(job)
            self._record_failure(job, reason)
        finally:
            if self.staging is not None:
                shutil.rmtree(self.staging, ignore_errors=True)

    def _record_failure(self, job, reason: str) -> None:
        self.dep.registry.record_event(self.spec.name, "failure", actor=self.actor, detail={
            "job": job.id, "step": job.failed_step.value if job.failed_step else None, "reason": reason,
            "gate": self.report.get("gate")})

    async def undo(self) -> None:
        dep, route = self.dep, self.spec.name
        if self.switched:
            dep.gateway.set_route(adapter_route(route))
        if self.started_engine:
            try:
                dep.gateway.remove_upstream(merged_upstream(route))
            except Exception:
                pass
            await asyncio.to_thread(dep.supervisor.stop, merged_upstream(route))
        if self.published and self.artifact is not None:
            remove_unused(self.artifact, dep.registry.artifacts_in_use())

    # --- steps ----------------------------------------------------------------------------------
    async def check(self) -> dict:
        from gateway.adapters import inspect_adapter, load_base_shapes

        spec, cfg = self.spec, self.dep.config
        if self.quantize == "awq":
            from merger.quantize import quantized_serving_problem

            problem = quantized_serving_problem()
            if problem:
                raise PromoteError(f"cannot serve an AWQ checkpoint here: {problem}",
                                   "promote with --quantize none (or auto)", step="check")
        if spec.eval is None or not spec.eval.is_file():
            raise PromoteError(f"adapter {spec.name} has no eval set ({spec.eval})",
                               f"set adapters.eval for {spec.name} in {cfg.source}: the gate needs it", step="check")
        shapes = await asyncio.to_thread(load_base_shapes, cfg.base.model)
        _, summary = await asyncio.to_thread(inspect_adapter, spec.path, root=None, base=shapes,
                                             max_lora_rank=cfg.engine.max_lora_rank)
        self.staging = cfg.gateway.state_dir / "artifacts" / f".staging-{self.fingerprint[:12]}-{time.time_ns()}"
        self.staging.mkdir(parents=True)
        detail = {"rank": summary.rank, "modules": len(summary.modules), "quantize": self.quantize,
                  "reuse": str(self.artifact) if self.artifact else None}
        return {**detail, "note": self.note} if self.note else detail

    async def merge(self) -> dict:
        from merger.api import MergeOptions, merge

        result = await asyncio.to_thread(merge, self.dep.config.base.model, [self.spec.path],
                                         self.staging / "merged", MergeOptions())
        self.candidate = result.out
        return {"seconds": round(result.seconds, 2), "tensors_merged": result.tensors_merged}

    async def quantize_step(self) -> dict:
        from merger.quantize import QuantizeOptions, quantize

        d = self.dep.config.deploy
        opts = QuantizeOptions(evaluate=False, samples=d.calibration_samples, seq_len=d.calibration_seq_len,
                               n_grid=d.awq_grid_points,
                               calibration=self.spec.calibration or self.spec.eval, log_path=self.staging / "quantize.log")
        result = await asyncio.to_thread(quantize, self.candidate, self.staging / "awq", opts)
        self.candidate = result.out
        return {"seconds": round(result.report.quantize_wall_s, 2),
                "size_mib": round(result.report.size_after_bytes / 2**20, 2)}

    async def validate(self) -> dict:
        from merger.validate import record_validation, validate

        cfg = self.dep.config
        candidate = self.artifact if self.artifact is not None else self.candidate
        from merger.quant_runner import candidate_runner_for

        runner = await asyncio.to_thread(candidate_runner_for, candidate, cfg.base.model)
        # the gate reads the first N eval items: enough to see a drop, bounded time on a CPU
        rows = self.spec.eval.read_text().splitlines()[: cfg.deploy.validate_max_prompts]
        eval_file = self.staging / "gate-eval.jsonl"
        eval_file.write_text("\n".join(rows) + "\n")
        report = await asyncio.to_thread(validate, cfg.base.model, self.spec.path, candidate, eval_file,
                                         self.max_kl, 0.0, candidate_runner=runner)
        drop = (report.reference_accuracy or 0.0) - (report.candidate_accuracy or 0.0)
        gate = {"mean_kl": report.mean_kl, "max_kl": self.max_kl, "accuracy_drop": round(drop, 4),
                "max_accuracy_drop": self.max_drop, "reference_accuracy": report.reference_accuracy,
                "candidate_accuracy": report.candidate_accuracy, "greedy_agreement": report.greedy_agreement}
        self.report["gate"] = gate
        failures = []
        if report.mean_kl > self.max_kl:
            failures.append(f"mean KL {report.mean_kl:.4g} > max_kl {self.max_kl:g}")
        if drop > self.max_drop:
            failures.append(f"accuracy drop {drop:.3f} > max_accuracy_drop {self.max_drop:g}")
        if failures:
            raise PromoteError(f"gate not met for {self.spec.name}: {'; '.join(failures)}",
                               "nothing was changed; retrain, use --quantize none, or relax [gates]", step="validate")
        if self.artifact is None and not self.dry_run:
            await asyncio.to_thread(record_validation, candidate, report)
            name = f"{self.spec.name}-{self.fingerprint[:12]}-{'awq' if self.quantize == 'awq' else 'merged'}"
            final = cfg.gateway.state_dir / "artifacts" / name
            self.artifact = await asyncio.to_thread(publish, candidate, final)
            self.published = True
        return gate

    async def start(self) -> dict:
        dep, route = self.dep, self.spec.name
        launch = dep.merged_launch(route, self.artifact)
        self.started_engine = True  # from here on, undo stops it
        engine = await asyncio.to_thread(dep.supervisor.start, merged_upstream(route), launch,
                                         dep.config.engine.start_timeout_s)
        dep.gateway.add_upstream(merged_upstream(route), engine.url, probe_model=launch.served_name)
        await self._warm_up(engine.url, launch.served_name)
        healthy = await dep.gateway.check_health()
        if not healthy.get(merged_upstream(route)):
            raise PromoteError(f"the merged engine for {route} does not generate", f"read {launch.log_path}",
                               step="start")
        return {"pid": engine.pid, "port": launch.port}

    async def _warm_up(self, url: str, model: str) -> None:
        n = self.dep.config.deploy.warmup_requests
        async with httpx.AsyncClient(timeout=60) as client:
            for i in range(n):
                r = await client.post(f"{url}/v1/chat/completions", json={
                    "model": model, "max_tokens": 8, "messages": [{"role": "user", "content": f"warm up {i}"}]})
                if r.status_code != 200:
                    raise PromoteError(f"warm-up request {i} to the merged engine failed: {r.status_code} {r.text[:200]}",
                                       "read the engine log in the state folder", step="start")

    async def switch(self) -> dict:
        t0 = time.monotonic()
        self.dep.gateway.set_route(merged_route(self.spec.name))
        self.switched = True
        return {"switched_in_ms": round((time.monotonic() - t0) * 1000, 3)}

    async def drain(self) -> dict:
        dep, route = self.dep, self.spec.name
        if dep.config.deploy.keep_adapter_loaded:
            return {"adapter": "kept loaded on the base engine (rollback is a route switch)"}
        # the base engine serves other routes too: wait for it to go idle, within the drain timeout
        drained = await dep.gateway.drain(BASE_UPSTREAM, dep.config.deploy.drain_timeout_s)
        await dep.gateway.unload_adapter(BASE_UPSTREAM, route)
        return {"adapter": "unloaded", "drained": drained}

    async def record(self) -> dict:
        dep = self.dep
        art = self.reusable
        if art is None:
            prov = json.loads((self.artifact / "switchyard.json").read_text())
            art = await asyncio.to_thread(
                lambda: dep.registry.add_artifact(
                    path=self.artifact, kind="merged-awq" if self.quantize == "awq" else "merged",
                    route=self.spec.name, fingerprint=self.fingerprint, sha256=tree_sha256(self.artifact),
                    provenance=prov))
        dep.registry.set_deployment(self.spec.name, "merged", artifact=art, actor=self.actor, event="promote",
                                    detail={"gate": self.report.get("gate"), "artifact": str(art.path),
                                            "reused": self.reusable is not None})
        return {"artifact": str(art.path)}
