"""Where a merge's time goes: `merge()` in-process on the 1.1B shape left by benchmarks/merge.py, with
parts of the work switched off by monkeypatching (diagnosis only; the outputs are not valid).

    .venv/bin/python benchmarks/merge_parts.py [--rounds 2] [--workers 2]

Variants, alternated: as is; without the output sha256; without the rounding statistics; without both.
Also prints hashlib's sha256 speed on buffers of growing size (cache-resident vs not).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


class _NoHash:
    def __init__(self, *args) -> None:
        pass

    def update(self, data) -> None:
        pass

    def hexdigest(self) -> str:
        return "0" * 64


def run(variant: str, base: Path, workers: int) -> float:
    import merger.core.apply as apply
    import merger.io.writer as writer
    from merger.api import MergeOptions, merge

    saved = writer.hashlib, apply._count_equal, apply._sumsq
    try:
        if "nohash" in variant:
            writer.hashlib = type("fake_hashlib", (), {"sha256": _NoHash})
        if "nostats" in variant:
            apply._count_equal = lambda a, b, scratch=None: 0
            apply._sumsq = lambda t: 1.0
        t0 = time.perf_counter()
        merge(base / "base", [base / "adapter"], base / "parts-out", MergeOptions(force=True, workers=workers))
        return time.perf_counter() - t0
    finally:
        writer.hashlib, apply._count_equal, apply._sumsq = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/switchyard-merge-bench/tinyllama"))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("XDG_CACHE_HOME", str(args.workdir / "cache"))  # the base hash, cached
    results: dict[str, list[float]] = {v: [] for v in ("as is", "nohash", "nostats", "nohash+nostats")}
    for _ in range(args.rounds):
        for v in results:
            results[v].append(round(run(v, args.workdir, args.workers), 2))
    print(json.dumps({"merge() seconds": results}))
    speeds = {}
    for n in (1 << 20, 24 << 20, 256 << 20):
        data, reps = os.urandom(n), max(1, (512 << 20) // n)
        h, t0 = hashlib.sha256(), time.perf_counter()
        for _ in range(reps):
            h.update(data)
        speeds[f"{n >> 20} MiB"] = round(n * reps / (time.perf_counter() - t0) / 1e9, 2)
    print(json.dumps({"sha256 GB/s by buffer size": speeds}))


if __name__ == "__main__":
    main()
