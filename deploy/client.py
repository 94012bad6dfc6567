"""The CLI's side of the admin API: a small synchronous client that turns error bodies into DeployError."""

from __future__ import annotations

import httpx

from deploy.errors import DeployError
from deploy.keys import admin_key
from switchyard.config import DeploymentConfig


class AdminClient:
    def __init__(self, config: DeploymentConfig, url: str | None = None, timeout_s: float = 30.0) -> None:
        host = config.gateway.host if config.gateway.host not in ("0.0.0.0", "::") else "127.0.0.1"
        self.url = (url or f"http://{host}:{config.gateway.port}").rstrip("/")
        key = admin_key(config)
        if key is None:
            raise DeployError("no admin key: set SWITCHYARD_ADMIN_KEY or gateway.admin_key",
                              f"or start `switchyard serve --config {config.source}` first (it creates one)")
        self._http = httpx.Client(base_url=self.url, timeout=timeout_s,
                                  headers={"Authorization": f"Bearer {key}"})

    def _call(self, method: str, path: str, **kwargs) -> dict:
        try:
            r = self._http.request(method, path, **kwargs)
        except httpx.ConnectError:
            raise DeployError(f"no switchyard serve answers at {self.url}",
                              "start it with `switchyard serve --config FILE`, or pass --url") from None
        except httpx.TimeoutException:
            raise DeployError(f"{self.url} did not answer {method} {path} in time", "is serve overloaded?") from None
        if r.status_code >= 400:
            try:
                message = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = r.text[:300]
            raise DeployError(f"{method} {path}: {r.status_code}: {message}")
        return r.json()

    def promote(self, name: str, **body) -> dict:
        return self._call("POST", f"/admin/promote/{name}", json=body)

    def job(self, job_id: str) -> dict:
        return self._call("GET", f"/admin/jobs/{job_id}")

    def rollback(self, name: str, actor: str) -> dict:
        return self._call("POST", f"/admin/rollback/{name}", json={"actor": actor})

    def status(self) -> dict:
        return self._call("GET", "/admin/deployment")

    def close(self) -> None:
        self._http.close()
