"""Run `switchyard serve` as a real subprocess for the deploy tests, and load it while things change."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from switchyard.config import DeploymentConfig

ROOT = Path(__file__).resolve().parents[2]
SWITCHYARD = [sys.executable, "-m", "switchyard.cli"]


def write_config(config: DeploymentConfig, folder: Path, port: int, **gates: float) -> Path:
    """The demo's deployment with its own state folder and port (absolute paths throughout)."""
    lines = [
        "[base]", f'model = "{config.base.model}"', f'name = "{config.base.name}"', "",
        "[engine]", f"max_lora_rank = {config.engine.max_lora_rank}", f"max_loras = {config.engine.max_loras}",
        f"max_model_len = {config.engine.max_model_len}", f"kv_cache_gib = {config.engine.kv_cache_gib}",
        f'dtype = "{config.engine.dtype}"', "start_timeout_s = 900",
        # merged engines (no LoRA) would compile with inductor on every start: ~30 s each idle, more
        # under load, six starts in the module; these tests exercise switchyard, not vLLM's compiler
        'extra_args = ["--enforce-eager"]', "",
        "[gateway]", 'host = "127.0.0.1"', f"port = {port}", f'state_dir = "{folder / "state"}"',
        f'adapters_root = "{config.adapters[0].path.parent}"', "",
        "[gates]", f"max_kl = {gates.get('max_kl', config.gates.max_kl)}",
        f"max_accuracy_drop = {gates.get('max_accuracy_drop', config.gates.max_accuracy_drop)}", "",
        "[deploy]", "drain_timeout_s = 10", "warmup_requests = 2",
        "validate_max_prompts = 16", "",  # the gate on 16 eval items: enough to tell, a third of the time
    ]
    for a in config.adapters:
        lines += ["[[adapters]]", f'name = "{a.name}"', f'path = "{a.path}"', f'eval = "{a.eval}"', ""]
    path = folder / "switchyard.toml"
    path.write_text("\n".join(lines))
    return path


def cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([*SWITCHYARD, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@dataclass
class Serve:
    config_path: Path
    port: int
    log_path: Path
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 600) -> "Serve":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([*SWITCHYARD, "serve", "--config", str(self.config_path)], stdout=log,
                                     stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"serve not ready in {timeout_s} s:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 120) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def status(self) -> dict:
        r = cli("status", "--config", str(self.config_path), "--json", timeout=60)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def modes(self) -> dict[str, str]:
        return {r["name"]: r["mode"] for r in self.status()["routes"]}


@dataclass
class Load:
    """Steady concurrent chat requests on one route; records (time, status, mode, error) per request."""

    url: str
    model: str
    workers: int = 2
    pause_s: float = 0.1
    records: list[tuple[float, int, str | None, str | None]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def _worker(self, i: int) -> None:
        with httpx.Client(timeout=120) as client:
            n = 0
            while not self._stop.is_set():
                n += 1
                body = {"model": self.model, "max_tokens": 8, "temperature": 0,
                        "messages": [{"role": "user", "content": f"fox owl cat {i} {n}"}]}
                stream = n % 2 == 0
                try:
                    if stream:
                        body["stream"] = True
                        with client.stream("POST", f"{self.url}/v1/chat/completions", json=body) as r:
                            text = "".join(r.iter_text())
                            ok = r.status_code == 200 and "data: [DONE]" in text and '"error"' not in text
                            err = None if ok else f"{r.status_code} {text[-200:]}"
                    else:
                        r = client.post(f"{self.url}/v1/chat/completions", json=body)
                        err = None if r.status_code == 200 else f"{r.status_code} {r.text[:200]}"
                    self.records.append((time.monotonic(), r.status_code if err is None else -1,
                                         r.headers.get("x-switchyard-mode"), err))
                except httpx.HTTPError as exc:
                    self.records.append((time.monotonic(), -1, None, repr(exc)))
                # steady, not saturating: the promote must still get CPU to start its engine
                self._stop.wait(self.pause_s)

    def __enter__(self) -> "Load":
        self._threads = [threading.Thread(target=self._worker, args=(i,), daemon=True) for i in range(self.workers)]
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=180)

    def failures(self) -> list:
        return [r for r in self.records if r[1] != 200]

    def modes(self) -> list[str | None]:
        return [r[2] for r in sorted(self.records)]
