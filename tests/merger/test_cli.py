"""`switchyard merge` as a process: it exits without the interpreter's finalisation (QUICK_EXIT), so
what it printed must still arrive, flushed, and the output must be complete."""

from __future__ import annotations

import json
import subprocess
import sys

from safetensors.torch import load_file

from tests.merger.common import make_adapter, tiny_model

# the console script, plus an exit handler that reports whether the interpreter finalised
ENTRY = ("import atexit, sys; atexit.register(lambda: print('finalised', file=sys.stderr)); "
         "from switchyard.cli import main; main()")


def test_merge_command_output_arrives_and_the_checkpoint_is_complete(tmp_path):
    base = tiny_model(tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "adapter", r=4, target_modules=["q_proj", "v_proj"])
    out = tmp_path / "out"
    with open(tmp_path / "stdout.txt", "w") as stdout:  # a file: block-buffered, lost unless flushed
        proc = subprocess.run([sys.executable, "-c", ENTRY, "merge", str(base), str(adapter), "--out", str(out),
                               "--quiet"], stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    printed = (tmp_path / "stdout.txt").read_text()
    assert printed.startswith("merged ") and f"into {out} " in printed and printed.endswith("\n")
    assert "finalised" not in proc.stderr  # the interpreter's exit handlers were skipped
    prov = json.loads((out / "switchyard.json").read_text())
    assert set(prov["output"]["shards_sha256"]) == {"model.safetensors"}
    assert "model.layers.0.self_attn.q_proj.weight" in load_file(out / "model.safetensors")


def test_quiet_merge_imports_no_rich_and_the_bar_merge_completes(tmp_path):
    base = tiny_model(tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "adapter", r=4, target_modules=["q_proj"])
    code = ("import sys; from switchyard.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print('rich imported:', 'rich' in sys.modules)")
    for quiet in (True, False):
        out = tmp_path / f"out-{quiet}"
        proc = subprocess.run([sys.executable, "-c", code, "merge", str(base), str(adapter), "--out", str(out)]
                              + (["--quiet"] if quiet else []), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert f"rich imported: {not quiet}" in proc.stdout and "merged " in proc.stdout
        assert (out / "switchyard.json").exists()
