"""Adapter vs merged vs merged-AWQ in ONE interleaved load test (the issue's headline comparison).

Each mode is a URL and the model name served there: three engines, or one gateway serving three
names. The adapter mode is the baseline A, so the report's ratios read "merged / adapter" and
"awq / adapter" with 95% bootstrap intervals. Any mode may be left out.

    .venv/bin/python -m loadtests.compare_modes \\
        --adapter http://127.0.0.1:8001@demo-reverse \\
        --merged  http://127.0.0.1:8002@demo-reverse-merged \\
        --awq     http://127.0.0.1:8003@demo-reverse-awq \\
        --out artifacts/loadtests/modes
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from loadtests.client import normalize_url
from loadtests.records import Target
from loadtests.session import LoadTestOptions, execute
from loadtests.workload import parse_levels
from switchyard.errors import SwitchyardError


def parse_mode(label: str, spec: str) -> Target:
    """`URL@MODEL`, split at the first '@': a model name may contain '@' (credentials in the URL,
    `http://user:pw@host`, are not supported here; pass --api-key)."""
    url, sep, model = spec.partition("@")
    if not sep or not model or not url:
        raise SwitchyardError(f"--{label} {spec!r} is not URL@MODEL", "e.g. http://127.0.0.1:8001@demo-reverse")
    return Target(label, normalize_url(url), model)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for mode in ("adapter", "merged", "awq"):
        p.add_argument(f"--{mode}", metavar="URL@MODEL", help=f"the {mode} mode's endpoint and served name")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--requests", type=int, default=None,
                   help="measured requests per mode and level (at least 2x the top concurrency per round) "
                        "[default: 96 unless --duration]")
    p.add_argument("--duration", type=float, default=None,
                   help="instead of --requests: seconds of measured load per mode and level")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--prompts", type=Path, help="JSONL prompts instead of synthetic ones")
    p.add_argument("--api-key")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("artifacts/loadtests/modes"))
    p.add_argument("--no-plots", action="store_true",
                   help="skip the PNGs (no matplotlib); draw them later with python -m loadtests.plots DIR")
    return p.parse_args(argv)


def build_options(args: argparse.Namespace) -> LoadTestOptions:
    """The load test the arguments describe; SwitchyardError for an unusable combination."""
    targets = tuple(parse_mode(m, getattr(args, m)) for m in ("adapter", "merged", "awq") if getattr(args, m))
    if len(targets) < 2:
        raise SwitchyardError("fewer than two modes given", "pass at least two of --adapter, --merged, --awq")
    if args.requests is not None and args.duration is not None:
        raise SwitchyardError("--requests and --duration were both given", "choose one of them")
    return LoadTestOptions(
        targets=targets, levels=tuple(parse_levels(args.concurrency, None, False)), out=args.out,
        requests=None if args.duration is not None else (96 if args.requests is None else args.requests),
        duration_s=args.duration,
        rounds=args.rounds, warmup=args.warmup, plots=not args.no_plots,
        prompts_file=args.prompts, input_len=None if args.prompts else args.input_len,
        output_len=args.output_len, seed=args.seed, api_key=args.api_key,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        opts = build_options(args)
        from rich.console import Console

        from loadtests.progress import comparison_table, summary_table

        console = Console(stderr=True)
        outcome = execute(opts, console)
        console.print(summary_table(outcome.results))
        console.print(comparison_table(outcome.results))
        console.print(f"report written to {outcome.out}")
        return 130 if outcome.interrupted else 0
    except SwitchyardError as exc:
        print(f"error: {exc.one_line()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
