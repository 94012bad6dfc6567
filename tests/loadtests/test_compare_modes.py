"""compare_modes' argument handling, and re-drawing a --no-plots report's PNGs afterwards."""

from __future__ import annotations

import pytest
from rich.console import Console

from loadtests import plots
from loadtests.compare_modes import build_options, main, parse_args, parse_mode
from loadtests.session import execute
from switchyard.errors import SwitchyardError
from tests.loadtests.fake_upstream import FakeOpenAI


def test_parse_mode():
    t = parse_mode("awq", "http://h:1/v1@my@model")
    assert (t.label, t.url, t.model) == ("awq", "http://h:1", "my@model")
    with pytest.raises(SwitchyardError, match="not URL@MODEL"):
        parse_mode("merged", "http://h:1")


def test_requests_or_duration():
    two = ["--adapter", "http://a:1@x", "--merged", "http://b:2@y"]
    assert build_options(parse_args(two)).requests == 96
    by_time = build_options(parse_args([*two, "--duration", "15", "--no-plots"]))
    assert (by_time.requests, by_time.duration_s, by_time.plots) == (None, 15.0, False)
    assert build_options(parse_args([*two, "--requests", "8"])).requests == 8
    assert build_options(parse_args([*two, "--requests", "0"])).requests == 0  # for plan() to refuse, not 96
    with pytest.raises(SwitchyardError, match="both given"):
        build_options(parse_args([*two, "--requests", "8", "--duration", "5"]))


def test_fewer_than_two_modes_exit_2(capsys):
    assert main(["--adapter", "http://a:1@x"]) == 2
    assert "fewer than two modes" in capsys.readouterr().err


def test_plots_drawn_later_from_report_json(tmp_path, capsys):
    args = parse_args(["--adapter", "http://fake@a", "--merged", "http://fake@b", "--concurrency", "1",
                       "--duration", "0.2", "--rounds", "1", "--warmup", "0", "--input-len", "8",
                       "--output-len", "2", "--no-plots", "--out", str(tmp_path / "rep")])
    out = execute(build_options(args), Console(file=open("/dev/null", "w")),
                  transport=FakeOpenAI(models=("a", "b")).transport()).out
    assert not list(out.glob("*.png")) and (out / "report.json").is_file()
    assert plots.main([str(out)]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["itl.png", "latency_cdf.png", "throughput.png", "ttft.png"]
    assert plots.main([str(tmp_path)]) == 2 and "usage" in capsys.readouterr().err
