"""How much system time does it cost to put N bytes from memory into a file, by path?

    .venv/bin/python benchmarks/write_paths.py [--gb 2.3] [--rounds 2] [--dir /tmp]

Paths: `write()` from a user buffer (what Python's file objects do), `vmsplice` + `splice` through a
pipe (`merger.io.splicewrite`, what `switchyard merge` uses where O_DIRECT is refused), O_DIRECT
through an aligned staging buffer (`merger.io.directwrite`, what it uses where the file system takes
it), and `cp` of a file of the same size (`copy_file_range`: the kernel copies page cache to page
cache). Each run writes a fresh file, fsyncs
it and deletes it, with a pause before each so that no run inherits pages another just freed.
Prints one JSON line per run, then a summary per path (median seconds of system time).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHUNK = 22 << 20  # a TinyLlama MLP weight in bf16


def _sys_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_stime


def by_write(path: Path, buf: bytearray, n: int) -> None:
    with open(path, "wb", buffering=0) as f:
        for _ in range(n):
            view = memoryview(buf)
            while view:
                view = view[f.write(view):]
        os.fsync(f.fileno())


def by_splice(path: Path, buf: bytearray, n: int) -> None:
    from merger.io.splicewrite import SpliceWriter

    sw = SpliceWriter()
    if not sw.usable:
        raise SystemExit("vmsplice is not available here")
    with open(path, "wb", buffering=0) as f:
        for _ in range(n):
            sw.write(f.fileno(), buf)
        os.fsync(f.fileno())
    sw.close()


def by_direct(path: Path, buf: bytearray, n: int) -> None:
    from merger.io.directwrite import DirectFile

    f = DirectFile.open(path)
    if f is None:
        raise SystemExit(f"O_DIRECT is refused under {path.parent}")
    for _ in range(n):
        f.write(buf)
    f.close()  # fsyncs


def by_cp(path: Path, src: Path) -> float:
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN).ru_stime
    subprocess.run(["bash", "-c", f"cp {src} {path} && sync"], check=True)
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_stime - r0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=2.3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dir", type=Path, default=Path("/tmp"))
    ap.add_argument("--pause", type=float, default=8.0, help="seconds before each run")
    args = ap.parse_args()
    n = max(1, int(args.gb * 1e9) // CHUNK)
    buf = bytearray(os.urandom(1 << 20)) * (CHUNK >> 20)
    src, dst = args.dir / "write_paths.src", args.dir / "write_paths.out"
    by_write(src, buf, n)  # cp's source, read through the page cache
    results: dict[str, list[float]] = {"write": [], "vmsplice+splice": [], "O_DIRECT": [], "cp": []}
    walls: dict[str, list[float]] = {k: [] for k in results}
    try:
        for r in range(args.rounds):
            for name in results:
                time.sleep(args.pause)
                t0, s0 = time.perf_counter(), _sys_s()
                if name == "cp":
                    sys_s = by_cp(dst, src)
                else:
                    {"write": by_write, "vmsplice+splice": by_splice, "O_DIRECT": by_direct}[name](dst, buf, n)
                    sys_s = _sys_s() - s0
                wall = time.perf_counter() - t0
                dst.unlink()
                results[name].append(sys_s)
                walls[name].append(wall)
                print(json.dumps({"round": r, "path": name, "bytes": n * CHUNK, "wall_s": round(wall, 2),
                                  "sys_s": round(sys_s, 2)}), flush=True)
    finally:
        src.unlink(missing_ok=True)
        dst.unlink(missing_ok=True)
    print(json.dumps({k: {"median_sys_s": round(statistics.median(v), 2), "median_wall_s":
                          round(statistics.median(walls[k]), 2), "sys_runs": v} for k, v in results.items()}))


if __name__ == "__main__":
    main()
