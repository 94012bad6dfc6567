"""deploy against real vLLM engines on the demo model: serve, promote under load, gate failures,
rollback under load, engine crash recovery, restart from the registry.

The tests run in file order and share one `serve` process (module scope) to keep engine starts few.
"""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
import pytest

from tests.deploy.serve_harness import Load, Serve, cli, write_config
from deploy.engines import free_port

pytestmark = [pytest.mark.engine, pytest.mark.slow]
ROUTE = "demo-reverse"


@pytest.fixture(scope="module")
def deployment(demo_config, tmp_path_factory):
    folder = tmp_path_factory.mktemp("deploy")
    port = free_port()
    config_path = write_config(demo_config, folder, port)
    serve = Serve(config_path, port, folder / "serve.log").start()
    yield serve
    serve.stop()


def test_serve_starts_routes_from_the_config(deployment):
    assert deployment.modes() == {"demo-base": "base", "demo-reverse": "adapter", "demo-sort": "adapter"}
    status = deployment.status()
    assert status["engines"]["base"]["alive"] and status["engines"]["base"]["state"] == "healthy"
    r = httpx.get(f"{deployment.url}/v1/models", timeout=10).json()
    assert {m["id"]: m["mode"] for m in r["data"]}["demo-sort"] == "adapter"


def test_promote_is_refused_without_the_admin_key(deployment):
    r = httpx.post(f"{deployment.url}/admin/promote/{ROUTE}", json={}, timeout=10)
    assert r.status_code == 401
    r = httpx.post(f"{deployment.url}/admin/promote/{ROUTE}", json={}, timeout=10,
                   headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 403


def test_a_gate_that_fails_changes_nothing(deployment):
    artifacts = deployment.config_path.parent / "state" / "artifacts"
    result = cli("promote", "demo-sort", "--config", str(deployment.config_path), "--quantize", "none",
                 "--max-kl", "0", "--max-accuracy-drop", "0")
    assert result.returncode != 0
    assert "gate not met" in result.stderr and "max_kl" in result.stderr, result.stderr
    assert deployment.modes()["demo-sort"] == "adapter"
    assert not any(p for p in artifacts.iterdir()) if artifacts.exists() else True
    history = json.loads(cli("history", "demo-sort", "--config", str(deployment.config_path), "--json").stdout)
    assert history[-1]["kind"] == "failure" and history[-1]["detail"]["step"] == "validate"
    assert "base" in deployment.status()["engines"] and len(deployment.status()["engines"]) == 1


def test_awq_where_vllm_cannot_serve_it_is_refused_at_check(deployment):
    from merger.quantize import quantized_serving_problem

    if quantized_serving_problem() is None:
        pytest.skip("this machine's vLLM serves W4A16: nothing to refuse")
    result = cli("promote", ROUTE, "--config", str(deployment.config_path), "--quantize", "awq")
    assert result.returncode != 0
    assert "failed at check" in result.stderr and "--quantize none" in result.stderr, result.stderr
    assert deployment.modes()[ROUTE] == "adapter"


def test_promote_under_load_loses_no_request(deployment, demo_config):
    with Load(deployment.url, ROUTE) as load:
        time.sleep(2)
        result = cli("promote", ROUTE, "--config", str(deployment.config_path), "--quantize", "auto")
        time.sleep(3)
    assert result.returncode == 0, result.stderr + deployment.log_tail()
    assert load.failures() == [], load.failures()[:5]
    modes = load.modes()
    assert modes[0] == "adapter" and modes[-1] == "merged"
    assert set(modes) == {"adapter", "merged"}
    assert deployment.modes()[ROUTE] == "merged"

    # the merged engine answers the eval set within the gate, through the gateway
    rows = [json.loads(line) for line in demo_config.adapter(ROUTE).eval.read_text().splitlines()[:40]]
    with httpx.Client(timeout=60) as client:
        answers = [client.post(f"{deployment.url}/v1/chat/completions", json={
            "model": ROUTE, "max_tokens": 32, "temperature": 0,
            "messages": [{"role": "user", "content": row["prompt"]}]}).json()["choices"][0]["message"]["content"]
            for row in rows]
    accuracy = sum(a.strip() == r["expected"].strip() for a, r in zip(answers, rows)) / len(rows)
    gate = json.loads(cli("history", ROUTE, "--config", str(deployment.config_path), "--json").stdout)[-1]
    assert gate["kind"] == "promote"
    reference = gate["detail"]["gate"]["reference_accuracy"]
    assert accuracy >= reference - demo_config.gates.max_accuracy_drop - 0.1, (accuracy, reference)


def test_a_second_promote_of_a_merged_route_is_refused(deployment):
    result = cli("promote", ROUTE, "--config", str(deployment.config_path))
    assert result.returncode != 0 and "already served merged" in result.stderr


def test_rollback_under_load_loses_no_request(deployment):
    with Load(deployment.url, ROUTE) as load:
        time.sleep(2)
        t0 = time.monotonic()
        result = cli("rollback", ROUTE, "--config", str(deployment.config_path))
        elapsed = time.monotonic() - t0
        time.sleep(2)
    assert result.returncode == 0, result.stderr
    assert load.failures() == [], load.failures()[:5]
    modes = load.modes()
    assert modes[0] == "merged" and modes[-1] == "adapter"
    assert deployment.modes()[ROUTE] == "adapter"
    print(f"rollback command took {elapsed:.2f} s: {result.stdout.strip()}")
    # the merged engine is drained and stopped
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "merged-demo-reverse" in deployment.status()["engines"]:
        time.sleep(0.5)
    assert "merged-demo-reverse" not in deployment.status()["engines"]


def test_promote_again_reuses_the_artifact(deployment):
    result = cli("promote", ROUTE, "--config", str(deployment.config_path), "--quantize", "auto")
    assert result.returncode == 0, result.stderr
    assert "✓ merge" not in result.stderr and "✓ validate" in result.stderr  # reused: validated again only
    event = json.loads(cli("history", ROUTE, "--config", str(deployment.config_path), "--json").stdout)[-1]
    assert event["kind"] == "promote" and event["detail"]["reused"] is True
    assert deployment.modes()[ROUTE] == "merged"


def test_killed_merged_engine_answers_503_then_recovers(deployment):
    pid = deployment.status()["engines"]["merged-demo-reverse"]["pid"]
    os.killpg(pid, signal.SIGKILL)
    body = {"model": ROUTE, "max_tokens": 4, "messages": [{"role": "user", "content": "cat dog"}]}
    saw_503, saw_unready, recovered = False, False, False
    deadline = time.monotonic() + 400
    with httpx.Client(timeout=30) as client:
        while time.monotonic() < deadline:
            r = client.post(f"{deployment.url}/v1/chat/completions", json=body)
            if r.status_code == 503:
                saw_503 = True
                assert "Retry-After" in r.headers and r.json()["error"]["message"]
                # The engine may come back between the two requests, so readyz is
                # checked for what it says while down, not required to be down.
                ready = client.get(f"{deployment.url}/readyz")
                if ready.status_code == 503:
                    saw_unready = True
                    assert ROUTE in ready.text
            elif r.status_code == 200 and saw_503:
                recovered = True
                break
            time.sleep(0.5)
    assert saw_503 and saw_unready and recovered
    assert deployment.status()["engines"]["merged-demo-reverse"]["restarts"] == 1


def test_restarted_serve_restores_routes_from_the_registry(deployment):
    engines = deployment.status()["engines"]
    assert deployment.stop() == 0
    for e in engines.values():  # every engine stopped with it
        with pytest.raises(ProcessLookupError):
            os.kill(e["pid"], 0)
    deployment.start()
    assert deployment.modes()[ROUTE] == "merged"
    r = httpx.post(f"{deployment.url}/v1/chat/completions", timeout=60, json={
        "model": ROUTE, "max_tokens": 4, "messages": [{"role": "user", "content": "cat dog"}]})
    assert r.status_code == 200 and r.headers["x-switchyard-mode"] == "merged"
    assert r.json()["model"] == ROUTE


def test_loadtest_swap_through_a_real_promote_and_rollback(deployment, tmp_path):
    """`switchyard loadtest swap` against the real serve: steady streaming load on demo-sort while it
    is promoted (merge, gate, engine start, switch) and rolled back; zero failed requests."""
    out = tmp_path / "swap"
    r = cli("loadtest", "swap", "demo-sort", "--config", str(deployment.config_path), "--concurrency", "1",
            "--settle", "4", "--window", "4", "--quantize", "none", "--input-len", "16", "--max-tokens", "8",
            "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "swap.json").read_text())
    assert report["requests_failed"] == 0 and report["requests_total"] > 5
    assert [(e["action"], e["ok"]) for e in report["events"]] == [("promote", True), ("rollback", True)]
    assert all(e["switched_at"] is not None for e in report["events"])
    assert len(report["windows"]) == 2 and all(w["after"]["requests"] > 0 for w in report["windows"])
    assert (out / "timeline.png").stat().st_size > 0 and "rollback" in (out / "swap.md").read_text()
    assert deployment.modes()["demo-sort"] == "adapter"
    kinds = [e["kind"] for e in json.loads(cli("history", "demo-sort", "--config", str(deployment.config_path),
                                                 "--json").stdout)]
    assert kinds[-2:] == ["promote", "rollback"]


def test_sigterm_during_a_promote_abandons_it_and_leaves_no_engine(deployment):
    """serve stopped while a promote is starting its merged engine: the job is recorded as abandoned,
    its staging folder is gone, no engine process survives, the route is unchanged."""
    import psutil

    from deploy.keys import admin_key
    from switchyard.config import load_config

    cfg = load_config(deployment.config_path)
    headers = {"Authorization": f"Bearer {admin_key(cfg)}"}
    r = httpx.post(f"{deployment.url}/admin/promote/demo-sort", json={"quantize": "none"}, headers=headers, timeout=30)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # wait until the merged engine is being started
        job = httpx.get(f"{deployment.url}/admin/jobs/{job_id}", headers=headers, timeout=10).json()
        if job.get("current") == "start" or job["status"] != "running":
            break
        time.sleep(0.2)
    assert job.get("current") == "start", job
    time.sleep(2)  # the engine process exists now
    serve_proc = psutil.Process(deployment.proc.pid)
    children = serve_proc.children(recursive=True)
    assert children
    assert deployment.stop() == 0
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, [p.pid for p in alive]
    history = json.loads(cli("history", "demo-sort", "--config", str(deployment.config_path), "--json").stdout)
    assert history[-1]["kind"] == "failure" and "abandoned" in history[-1]["detail"]["reason"]
    assert history[-1]["detail"]["step"] == "start"
    state = deployment.config_path.parent / "state"
    assert not list((state / "artifacts").glob(".staging-*"))
    from deploy.registry import Registry

    registry = Registry.open(cfg.gateway.state_dir / "registry.sqlite")
    assert registry.deployment("demo-sort").mode == "adapter" and registry.deployment(ROUTE).mode == "merged"
