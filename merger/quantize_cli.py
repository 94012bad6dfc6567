"""`switchyard quantize`: the command line over `merger.quantize.quantize`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer


def _progress(verbose: bool):
    """Stages as lines; the quantizer's own output on one overwritten status line (a TTY), or in full with -v."""
    tty = sys.stderr.isatty()
    state = {"status": False}

    def show(kind: str, text: str) -> None:
        if kind == "stage":
            if state["status"]:
                sys.stderr.write("\r\033[K")
                state["status"] = False
            typer.echo(f"quantize: {text}", err=True)
        elif verbose:
            typer.echo(f"  {text}", err=True)
        elif tty:
            sys.stderr.write("\r\033[K  " + text[:110])
            sys.stderr.flush()
            state["status"] = True

    def done() -> None:
        if state["status"]:
            sys.stderr.write("\r\033[K")
            state["status"] = False

    return show, done


def _fmt(x: float | None, pattern: str) -> str:
    return "-" if x is None else format(x, pattern)


def format_report(result) -> str:
    r = result.report
    lines = [f"wrote {result.out}",
             f"  weights       {r.size_before_bytes / 2**20:.1f} MiB -> {r.size_after_bytes / 2**20:.1f} MiB "
             f"({r.size_after_bytes / max(r.size_before_bytes, 1):.2f}x)",
             f"  quantize      {r.quantize_wall_s:.1f} s wall ({r.quantize_cpu_s:.0f} CPU s), peak RSS {r.quantize_peak_rss_mib:.0f} MiB, "
             f"{r.calibration_samples} samples / {r.calibration_tokens} tokens"]
    if r.full is not None and r.quantized is not None:
        lines.append(f"  accuracy      full {_fmt(r.full.accuracy, '.3f')}  quantized {_fmt(r.quantized.accuracy, '.3f')}  "
                     f"drop {_fmt(r.accuracy_drop, '+.3f')}  ({r.full.eval_items} eval prompts)")
        lines.append(f"  perplexity    full {_fmt(r.full.perplexity, '.3f')}  quantized {_fmt(r.quantized.perplexity, '.3f')}  "
                     f"ratio {_fmt(r.perplexity_ratio, '.4f')}  ({r.full.heldout_tokens} tokens: {r.heldout_source})")
    lines.append(f"  log           {result.log_path}")
    return "\n".join(lines)


def quantize_command(
    model: Path = typer.Argument(..., help="A merged full-precision checkpoint folder (`switchyard merge` output)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: <model>-awq-w4a16 beside MODEL)."),
    method: str = typer.Option("awq", "--method", help="Quantization method (awq)."),
    scheme: str = typer.Option("W4A16", "--scheme", help="W4A16 (symmetric) or W4A16_ASYM."),
    group_size: int = typer.Option(128, "--group-size", help="Weights per quantization group."),
    calibration: Optional[str] = typer.Option(
        None, "--calibration",
        help="JSONL of texts/chat messages, or 'builtin' (default: the adapter's eval set from "
             "switchyard.json, else builtin)."),
    samples: int = typer.Option(64, "--samples", help="Calibration samples (at most)."),
    seq_len: int = typer.Option(512, "--seq-len", help="Tokens per calibration sample (at most)."),
    ignore: list[str] = typer.Option(["lm_head"], "--ignore", help="Layers left unquantized (repeatable; 're:' regex)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out."),
    eval_set: Optional[Path] = typer.Option(None, "--eval", help="Eval JSONL {prompt, expected} for the accuracy report."),
    heldout: Optional[Path] = typer.Option(None, "--heldout", help="Held-out JSONL for perplexity (default: built-in)."),
    report: bool = typer.Option(True, "--report/--no-report", help="Evaluate full vs quantized after quantizing."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show the quantizer's full output."),
) -> None:
    """AWQ 4-bit quantization of a merged model into a compressed-tensors checkpoint vLLM serves."""
    from merger.quantize import QuantizeOptions, quantize, quantized_serving_problem

    options = QuantizeOptions(
        method=method, scheme=scheme, group_size=group_size,
        calibration=None if calibration is None else (calibration if calibration == "builtin" else Path(calibration)),
        samples=samples, seq_len=seq_len, ignore=tuple(ignore), force=force, evaluate=report,
        eval_set=eval_set, heldout=heldout,
    )
    show, done = _progress(verbose)
    try:
        result = quantize(model, out, options, progress=show)
    finally:
        done()
    typer.echo(format_report(result))
    problem = quantized_serving_problem()
    if problem:
        typer.echo(f"note: {problem}", err=True)


def register(app: typer.Typer) -> None:
    """Add `quantize` to the root app."""
    app.command("quantize")(quantize_command)
