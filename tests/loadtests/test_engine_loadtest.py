"""The load tester against the session's real vLLM engine (demo base + adapters): the CLI end to end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deploy.engines import free_port
from tests.loadtests.test_session import VLLM_FIELDS

pytestmark = pytest.mark.engine
ROOT = Path(__file__).resolve().parents[2]
SWITCHYARD = [sys.executable, "-m", "switchyard.cli"]


def loadtest(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([*SWITCHYARD, "loadtest", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "COLUMNS": "200"})


def test_tiny_interleaved_run_writes_a_valid_report(base_engine, tmp_path):
    out = tmp_path / "report"
    r = loadtest("--url", base_engine.url, "--model", "demo-base", "--model", "demo-reverse",
                 "--concurrency", "1,2", "--requests", "4", "--rounds", "2", "--warmup", "1",
                 "--input-len", "32", "--output-len", "8", "--slo", "ttft=10s", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "report written to" in r.stderr and "demo-reverse / demo-base" in r.stderr
    for name in ("report.json", "report.md", "requests.jsonl", "throughput.png", "latency_cdf.png",
                 "ttft.png", "itl.png"):
        assert (out / name).stat().st_size > 0, name
    report = json.loads((out / "report.json").read_text())
    assert [l["max_concurrency"] for l in report["levels"]] == [1, 2]
    for level in report["levels"]:
        for target in ("demo-base", "demo-reverse"):
            s = level["results"][target]
            assert set(VLLM_FIELDS) <= set(s)
            assert s["completed"] == 4 and s["failed"] == 0
            assert s["output_lens"] == [8] * 4  # usage-reported, fixed by ignore_eos
            assert all(n > 8 for n in s["input_lens"])  # ~32 prompt tokens, from usage
            assert all(len(itl) >= 1 for itl in s["itls"])
            assert 0 < s["mean_ttft_ms"] < s["mean_e2el_ms"] and s["p99_itl_ms"] >= s["p50_itl_ms"] > 0
            assert s["output_throughput"] > 0 and s["request_goodput"] is not None
        comp = level["comparisons"]["demo-reverse"]
        assert {"output_throughput", "mean_ttft_ms", "p99_itl_ms"} <= set(comp)
        assert comp["mean_itl_ms"]["verdict"] in ("significant", "not significant")
    reqs = report["requests"]
    assert len(reqs) == 2 * 2 * (4 + 1) and sum(r["warmup"] for r in reqs) == 4
    assert all(r["output_tokens_from"] == "usage" and r["error"] is None for r in reqs)


def test_unknown_model_fails_fast_with_one_line(base_engine, tmp_path):
    t = time.monotonic()
    r = loadtest("--url", base_engine.url, "--model", "demo-base", "--model", "no-such-model",
                 "--out", str(tmp_path / "x"), timeout=60)
    assert time.monotonic() - t < 30
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1].startswith("error: model 'no-such-model' is not served at")
    assert "demo-reverse" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x").exists()


def test_bad_url_fails_fast_with_one_line(tmp_path):
    t = time.monotonic()
    r = loadtest("--url", f"http://127.0.0.1:{free_port()}", "--model", "m", "--out", str(tmp_path / "x"),
                 timeout=60)
    assert time.monotonic() - t < 30
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: cannot connect to http://127.0.0.1:")


def test_ctrl_c_writes_the_partial_report(base_engine, tmp_path):
    out = tmp_path / "partial"
    proc = subprocess.Popen(
        [*SWITCHYARD, "loadtest", "--url", base_engine.url, "--model", "demo-base", "--model", "demo-sort",
         "--concurrency", "2", "--requests", "400", "--warmup", "0", "--input-len", "16",
         "--max-tokens", "8", "--out", str(out)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        raw = None
        while time.monotonic() < deadline:  # wait until some requests are on record
            raws = list(tmp_path.glob(".partial.tmp-*/requests.jsonl"))
            if raws and raws[0].read_text().count('"kind": "request"') >= 3:
                raw = raws[0]
                break
            assert proc.poll() is None, proc.communicate()[1]
            time.sleep(0.2)
        assert raw is not None, "no requests recorded within 120 s"
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "partial report written to" in stderr and "Traceback" not in stderr
    report = json.loads((out / "report.json").read_text())
    assert report["interrupted"] is True
    done = report["levels"][0]["results"]["demo-base"]["completed"]
    assert 3 <= done < 400 and len(report["requests"]) >= 3
    assert "Interrupted" in (out / "report.md").read_text()
