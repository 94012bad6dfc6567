"""`switchyard loadtest ...` (run a load test) and `switchyard loadtest swap ...` (load during a switch).

`loadtest` is a group that runs a load test when called without a subcommand, so subcommands
such as `swap` can sit beside it. Imports of the load-test machinery stay inside the commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from loadtests.errors import LoadTestError

loadtest_app = typer.Typer(
    help="Measure models side by side under load (interleaved), with percentiles, B/A intervals and plots.",
    invoke_without_command=True,
    no_args_is_help=False,
)


@loadtest_app.callback(invoke_without_command=True)
def loadtest(
    ctx: typer.Context,
    url: Optional[str] = typer.Option(None, "--url", help="Root of an OpenAI-compatible server, e.g. http://127.0.0.1:8000."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="SWITCHYARD_API_KEY", help="Bearer token."),
    model: List[str] = typer.Option([], "--model", help="Model to test (repeat to compare; the first is A). NAME or NAME@URL."),
    concurrency: Optional[str] = typer.Option(None, "--concurrency", help="Levels of requests in flight, e.g. 1,4,16 (default 1)."),
    rate: Optional[str] = typer.Option(None, "--rate", help="Levels of arrival rate per model, req/s, e.g. 2,8."),
    poisson: bool = typer.Option(False, "--poisson", help="With --rate: Poisson arrivals instead of evenly spaced."),
    requests: Optional[int] = typer.Option(None, "--requests", help="Measured requests per model and level (default 32)."),
    duration: Optional[float] = typer.Option(None, "--duration", help="Seconds of measured load per model and level."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help='JSONL file of {"prompt": ...} lines.'),
    input_len: Optional[int] = typer.Option(None, "--input-len", help="Synthetic prompts of about this many tokens (default 128)."),
    output_len: Optional[int] = typer.Option(None, "--output-len", help="Fixed output length: max_tokens with ignore_eos."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="max_tokens per request (default 64; overrides --output-len)."),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Generate max_tokens every time (vLLM extension)."),
    warmup: int = typer.Option(2, "--warmup", help="Excluded warm-up requests per model at each level."),
    seed: int = typer.Option(0, "--seed", help="Seeds prompts, order, arrivals and the bootstrap."),
    rounds: int = typer.Option(4, "--rounds", help="Interleaved batches per model and level."),
    slo: Optional[str] = typer.Option(None, "--slo", help="Goodput SLOs, e.g. ttft=500ms,tpot=50ms,e2el=2s."),
    endpoint: str = typer.Option("completions", "--endpoint", help="completions or chat."),
    timeout: float = typer.Option(300.0, "--timeout", help="Seconds before one request counts as failed."),
    out: Path = typer.Option(Path("loadtest-report"), "--out", help="Report folder (replaced if it exists)."),
    no_plots: bool = typer.Option(False, "--no-plots", help="Skip the PNG plots."),
) -> None:
    """Load-test one or more models, interleaved, and write report.json, report.md and plots."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.console import Console

    from loadtests.progress import comparison_table, summary_table
    from loadtests.session import LoadTestOptions, execute, parse_slo, parse_targets
    from loadtests.workload import parse_levels

    if not model:
        raise LoadTestError("no --model given", "e.g. switchyard loadtest --url http://127.0.0.1:8000 --model A --model B")
    for name, value in (("--requests", requests), ("--input-len", input_len), ("--output-len", output_len),
                        ("--max-tokens", max_tokens), ("--rounds", rounds)):
        if value is not None and value < 1:
            raise LoadTestError(f"{name} {value} must be at least 1", f"pass a positive {name}")
    if warmup < 0 or timeout <= 0:
        raise LoadTestError("--warmup must be >= 0 and --timeout > 0", "fix the option")
    if requests is None and duration is None:
        requests = 32
    opts = LoadTestOptions(
        targets=parse_targets(model, url), levels=tuple(parse_levels(concurrency, rate, poisson)), out=out,
        requests=requests, duration_s=duration, prompts_file=prompts, input_len=input_len,
        output_len=output_len, max_tokens=max_tokens, ignore_eos=ignore_eos, warmup=warmup, seed=seed,
        rounds=rounds, endpoint=endpoint, api_key=api_key, slo_ms=parse_slo(slo), timeout_s=timeout,
        plots=not no_plots,
    )
    console = Console(stderr=True)
    outcome = execute(opts, console)
    console.print(summary_table(outcome.results))
    comparison = comparison_table(outcome.results)
    if comparison is not None:
        console.print(comparison)
    if outcome.interrupted:
        console.print(f"interrupted: partial report written to {outcome.out}")
        raise typer.Exit(130)
    console.print(f"report written to {outcome.out}")


@loadtest_app.command("swap")
def swap(
    name: str = typer.Argument(..., help="Stable model name to keep under load."),
    config: Path = typer.Option(..., "--config", help="The deployment file (switchyard.toml)."),
    url: Optional[str] = typer.Option(None, "--url", help="Gateway URL [default: from the config]."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="SWITCHYARD_API_KEY", help="Client key for the gateway."),
    concurrency: int = typer.Option(4, "--concurrency", help="Requests in flight throughout."),
    settle: float = typer.Option(10.0, "--settle", help="Seconds of load before, between and after the switches."),
    window: float = typer.Option(5.0, "--window", help="Seconds each side of a switch to compare latency over."),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="awq or none [default: the config's]."),
    input_len: int = typer.Option(64, "--input-len", help="Synthetic prompt length, tokens (about)."),
    max_tokens: int = typer.Option(32, "--max-tokens", help="Fixed output length (ignore_eos)."),
    endpoint: str = typer.Option("completions", "--endpoint", help="completions or chat."),
    out: Path = typer.Option(Path("swap-report"), "--out", help="Report folder (replaced if it exists)."),
) -> None:
    """Steady load on NAME while a promote and then a rollback run; fails if any request failed."""
    import getpass

    from rich.console import Console

    from deploy.client import AdminClient
    from loadtests.client import normalize_url
    from loadtests.swap import SwapOptions, execute_swap
    from switchyard.config import load_config

    if quantize not in (None, "awq", "none"):
        raise LoadTestError(f"--quantize {quantize!r} is unknown", "use awq or none")
    if concurrency < 1 or settle < 0 or window <= 0:
        raise LoadTestError("--concurrency must be >= 1, --settle >= 0 and --window > 0", "fix the option")
    cfg = load_config(config)
    admin = AdminClient(cfg, url)
    opts = SwapOptions(name=name, url=normalize_url(admin.url), out=out, api_key=api_key,
                       concurrency=concurrency, settle_s=settle, window_s=window, input_len=input_len,
                       max_tokens=max_tokens, endpoint=endpoint,
                       promote_body=(("quantize", quantize),) if quantize else (),
                       actor=f"loadtest-swap:{getpass.getuser()}")
    try:
        execute_swap(opts, admin, Console(stderr=True))
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    finally:
        admin.close()


def register(app: typer.Typer) -> None:
    """Add `loadtest` (and `loadtest swap`) to the root app."""
    app.add_typer(loadtest_app, name="loadtest")
