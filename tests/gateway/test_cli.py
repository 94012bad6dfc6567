"""`switchyard gateway`: a deployment's static table served against engines already running."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx

from deploy.engines import free_port
from gateway.core.routing import config_routes
from switchyard.config import parse_config

TOML = """
[base]
model = "base"
name = "canned-base"
[engine]
max_lora_rank = 8
[[adapters]]
name = "bot"
path = "adapters/bot"
"""


def test_config_routes_put_base_and_adapters_on_one_engine(tmp_path):
    table = config_routes(parse_config(TOML, source=tmp_path / "switchyard.toml"), "base")
    assert [(r.name, r.upstream, r.upstream_model, r.mode) for r in table] == [
        ("canned-base", "base", "canned-base", "base"), ("bot", "base", "bot", "adapter")]


def test_gateway_command_serves_the_table(tmp_path, canned):
    config = tmp_path / "switchyard.toml"
    config.write_text(TOML)
    port = free_port()
    env = {"PATH": "/usr/bin:/bin", "SWITCHYARD_API_KEYS": "k", "HOME": str(tmp_path)}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "switchyard"), "gateway", "--config", str(config),
                             "--engine", canned.url, "--merged", f"fast={canned.url}", "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": "Bearer k"})
                break
            except httpx.ConnectError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else ""
                time.sleep(0.2)
        assert [(m["id"], m["mode"]) for m in r.json()["data"]] == [
            ("canned-base", "base"), ("bot", "adapter"), ("fast", "merged")]
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401  # the env's key applies
    finally:
        proc.terminate()
        proc.wait(15)
