"""`loadtest swap`: windows around switches (pure) and the driver against a fake admin + fake upstream."""

from __future__ import annotations

import json
import time
from dataclasses import asdict

import pytest
from rich.console import Console

from loadtests.errors import LoadTestError
from loadtests.swap import SwapOptions, SwitchEvent, execute_swap, switch_windows
from tests.loadtests.fake_upstream import FakeOpenAI
from tests.loadtests.test_analysis import request


def test_switch_windows_split_requests_at_the_switch():
    reqs = [request(start=float(t), ttft=0.1 if t < 10 else 0.05, n_tokens=3, index=t) for t in range(20)]
    reqs.append(request(start=9.95, error="reset", n_tokens=0))
    ev = SwitchEvent("promote", 5.0, 12.0, 10.0, True)
    (w,) = switch_windows(reqs, [ev, SwitchEvent("rollback", 13.0, 13.1, None, False)], window_s=3.0)
    assert w["before"]["requests"] == 4 and w["before"]["failed"] == 1   # starts 7, 8, 9, 9.95
    assert w["after"]["requests"] == 3 and w["after"]["failed"] == 0     # starts 10, 11, 12
    assert w["before"]["p50_ttft_ms"] == pytest.approx(100.0) and w["after"]["p50_ttft_ms"] == pytest.approx(50.0)
    assert w["in_flight_at_switch"] == 1 and w["in_flight_failed"] == 1   # the 9.95 one spans 10.0


def test_an_empty_window_is_named_with_the_fix():
    from loadtests.swap import render_swap_markdown

    # the second request spans the switch at 2.0 and the whole after window
    slow = [request(start=0.0, ttft=0.1, n_tokens=3), request(start=1.0, ttft=0.1, itl=4.0, n_tokens=3)]
    ev = SwitchEvent("promote", 0.5, 2.5, 2.0, True)
    report = {"name": "m", "interrupted": False, "requests_total": 2, "requests_failed": 0, "errors": [],
              "events": [asdict(ev)], "windows": switch_windows(slow, [ev], window_s=3.0)}
    assert report["windows"][0]["after"]["requests"] == 0
    assert "no request started in the after window: widen --window" in render_swap_markdown(report)
    report["windows"] = switch_windows(slow + [request(start=3.0, ttft=0.1, n_tokens=3)], [ev], window_s=3.0)
    assert "widen" not in render_swap_markdown(report)


def test_switch_moment_counts_the_time_between_steps():
    from loadtests.swap import _switch_moment

    # service clock: job created at 1000; a 3 s gap before "start" that step durations do not show
    job = {"created_at": 1000.0, "done": [{"step": "check", "seconds": 1.0, "ended_at": 1001.0},
                                          {"step": "start", "seconds": 2.0, "ended_at": 1006.0},
                                          {"step": "switch", "seconds": 0.5, "ended_at": 1006.5}]}
    assert _switch_moment(job, start=10.0, end=30.0) == pytest.approx(16.5)
    assert _switch_moment(job, start=10.0, end=12.0) == 12.0  # never after the answer
    legacy = {"done": [{k: v for k, v in d.items() if k != "ended_at"} for d in job["done"]]}
    assert _switch_moment(legacy, start=10.0, end=30.0) == pytest.approx(13.5)
    assert _switch_moment({"created_at": 1000.0, "done": job["done"][:2]}, 10.0, 30.0) is None


class FakeAdmin:
    """Promote: 'running' for two polls, then done with a switch step; flips the upstream's speed."""

    def __init__(self, fake: FakeOpenAI, fail_during_promote: bool = False):
        self.fake, self.fail = fake, fail_during_promote
        self.polls = 0
        self.calls = []

    def promote(self, name, **body):
        self.calls.append(("promote", name, body))
        if self.fail:
            self.fake.fail_model = name
        self.t_promote = time.perf_counter()
        return {"id": "j1", "status": "running", "done": []}

    def job(self, job_id):
        self.polls += 1
        if self.polls < 2:
            return {"id": job_id, "status": "running", "done": [{"step": "check", "seconds": 0.01}]}
        self.fake.fail_model = None
        self.fake.delays = {"m": (0.002, 0.001)}  # "merged" is faster from now on
        elapsed = time.perf_counter() - self.t_promote  # step times consistent with the flip
        return {"id": job_id, "status": "succeeded", "error": None,
                "done": [{"step": "check", "seconds": 0.01}, {"step": "switch", "seconds": elapsed - 0.01},
                         {"step": "drain", "seconds": 0.0}]}

    def rollback(self, name, actor):
        self.calls.append(("rollback", name, actor))
        time.sleep(0.2)  # reloading the adapter on the base engine comes before the switch
        self.fake.delays = {}
        return {"route": name, "mode": "adapter", "switched_in_s": 0.2, "retiring": "merged-1"}


def opts(tmp_path, settle_s=0.3, window_s=0.25):
    return SwapOptions(name="m", url="http://gw", out=tmp_path / "swap", concurrency=2, settle_s=settle_s,
                       window_s=window_s, input_len=8, max_tokens=4, promote_body=(("quantize", "awq"),))


def test_swap_under_load_reports_zero_failures_and_the_timeline(tmp_path):
    fake = FakeOpenAI(models=("m",), ttft_s=0.01, itl_s=0.004)
    admin = FakeAdmin(fake)
    # windows wide enough that a late-starting admin thread on a busy machine (the switch moment is
    # reckoned from when the promote was asked) cannot fill the after window with pre-switch requests
    report = execute_swap(opts(tmp_path, settle_s=1.0, window_s=0.6), admin, Console(file=open("/dev/null", "w")), transport=fake.transport())
    assert [c[0] for c in admin.calls] == ["promote", "rollback"] and admin.calls[0][2]["quantize"] == "awq"
    assert report["requests_failed"] == 0 and report["requests_total"] > 20
    assert [e["action"] for e in report["events"]] == ["promote", "rollback"]
    promote = report["events"][0]
    assert promote["start"] < promote["switched_at"] <= promote["end"]
    rollback = report["events"][1]  # switched after the adapter reload, not when it was asked for
    assert rollback["start"] + 0.15 < rollback["switched_at"] <= rollback["end"]
    w = report["windows"][0]
    assert w["before"]["requests"] > 0 and w["after"]["requests"] > 0
    assert w["after"]["p50_e2el_ms"] < w["before"]["p50_e2el_ms"]  # the fake got faster at the switch
    out = tmp_path / "swap"
    assert {p.name for p in out.iterdir()} == {"swap.json", "swap.md", "timeline.png"}
    assert json.loads((out / "swap.json").read_text())["requests_failed"] == 0
    assert "around the promote switch" in (out / "swap.md").read_text()


def test_swap_fails_when_requests_fail_but_writes_the_report(tmp_path):
    fake = FakeOpenAI(models=("m",), ttft_s=0.01, itl_s=0.004)
    with pytest.raises(LoadTestError, match=r"requests failed during the swap"):
        execute_swap(opts(tmp_path), FakeAdmin(fake, fail_during_promote=True),
                     Console(file=open("/dev/null", "w")), transport=fake.transport())
    report = json.loads((tmp_path / "swap" / "swap.json").read_text())
    assert report["requests_failed"] > 0 and any("engine exploded" in e for e in report["errors"])
