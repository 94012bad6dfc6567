"""Where the admin key comes from: SWITCHYARD_ADMIN_KEY, else the config's gateway.admin_key, else
`<state_dir>/admin.key`, which `serve` creates (random, mode 0600) when neither is set, so a local
deployment is never left with an open admin API and the CLI on the same machine can still use it."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from switchyard.config import DeploymentConfig


def key_file(config: DeploymentConfig) -> Path:
    return config.gateway.state_dir / "admin.key"


def admin_key(config: DeploymentConfig, *, create: bool = False) -> str | None:
    env = os.environ.get("SWITCHYARD_ADMIN_KEY")
    if env:
        return env
    if config.gateway.admin_key is not None:
        return config.gateway.admin_key.get_secret_value()
    path = key_file(config)
    if path.is_file():
        return path.read_text().strip() or None
    if not create:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    key = "sy-admin-" + secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key


def client_keys(config: DeploymentConfig) -> tuple[str, ...] | None:
    """Config client keys, unless SWITCHYARD_API_KEYS is set (then the gateway reads the environment)."""
    if os.environ.get("SWITCHYARD_API_KEYS"):
        return None
    return tuple(k.get_secret_value() for k in config.gateway.api_keys) or None
