"""The `switchyard` command's contract for bad input: one line naming the problem and the fix, a
non-zero exit, no traceback unless --debug."""

import json
import subprocess
import sys
from pathlib import Path

CLI = [sys.executable, "-m", "switchyard"]  # switchyard/__main__.py, as on the GPU machine


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120)


def assert_one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_wrong_config_path(tmp_path: Path):
    assert_one_line_error(run("status", "--config", str(tmp_path / "nope.toml")), "does not exist", "--config")


def test_missing_config_key(tmp_path: Path):
    cfg = tmp_path / "s.toml"
    cfg.write_text('[engine]\nmax_loras = 2\n')
    assert_one_line_error(run("history", "--config", str(cfg)), "'base'", str(cfg))


def test_model_folder_without_weights(tmp_path: Path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "base" / "pytorch_model.bin").write_bytes(b"")
    cfg = tmp_path / "s.toml"
    cfg.write_text('[base]\nmodel = "base"\n[gateway]\nport = 0\n')
    assert_one_line_error(run("serve", "--config", str(cfg)), "no .safetensors weights", "pytorch_model.bin")


def test_debug_shows_the_traceback(tmp_path: Path):
    r = run("--debug", "status", "--config", str(tmp_path / "nope.toml"))
    assert r.returncode == 2 and "Traceback" in r.stderr and "error: config file" in r.stderr


def test_help_lists_every_command():
    r = run("--help")
    assert r.returncode == 0
    for command in ("merge", "validate", "quantize", "serve", "promote", "rollback", "status", "history",
                    "loadtest", "demo"):
        assert command in r.stdout, command
