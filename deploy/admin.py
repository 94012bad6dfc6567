"""deploy's admin routes, mounted on the gateway app next to its own (same admin key):

    POST /admin/promote/{name}     start a promote job (202) — 409 while one runs for that name
    GET  /admin/jobs/{id}          the job's steps so far, its status and error
    POST /admin/rollback/{name}    route back to the adapter (the merged engine is drained and stopped)
    GET  /admin/deployment         routes, modes, engines (pid, port, health, in-flight), artifacts
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from gateway.auth import require_admin
from gateway.core.errors import NotFound


class PromoteBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    quantize: Literal["awq", "none", "auto"] | None = None
    dry_run: bool = False
    actor: str = Field("unknown", max_length=200)
    max_kl: float | None = Field(None, ge=0)
    max_accuracy_drop: float | None = Field(None, ge=0)


class RollbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    actor: str = Field("unknown", max_length=200)


def build_router(deployment) -> APIRouter:
    router = APIRouter(prefix="/admin", tags=["deploy"], dependencies=[Depends(require_admin)])

    @router.post("/promote/{name}", status_code=202)
    async def promote(name: str, body: PromoteBody) -> dict:
        gates = {k: v for k, v in (("max_kl", body.max_kl), ("max_accuracy_drop", body.max_accuracy_drop))
                 if v is not None}
        job = deployment.start_promote(name, quantize=body.quantize or deployment.config.deploy.quantize,
                                       dry_run=body.dry_run, actor=body.actor, gates=gates)
        return job.to_dict()

    @router.get("/jobs/{job_id}")
    async def job(job_id: str) -> dict:
        if job_id not in deployment.jobs:
            raise NotFound(f"no promote job {job_id!r}", "jobs live only as long as the serve process")
        return deployment.jobs[job_id].to_dict()

    @router.post("/rollback/{name}")
    async def rollback(name: str, body: RollbackBody | None = None) -> dict:
        return await deployment.rollback(name, actor=(body.actor if body else "unknown"))

    @router.get("/deployment")
    async def status() -> dict:
        return deployment.status()

    return router


def switchyard_error_handler(status: int):
    """Map deploy's and config's SwitchyardErrors to OpenAI-style bodies with `status`."""

    async def handler(request: Request, exc) -> JSONResponse:
        return JSONResponse({"error": {"message": exc.one_line(), "type": type(exc).__name__, "code": status}},
                            status_code=status)

    return handler
