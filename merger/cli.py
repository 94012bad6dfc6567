"""`switchyard merge` and `switchyard validate` (root commands)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer


def merge_command(
    base: Path = typer.Argument(..., help="Hugging Face checkpoint folder (safetensors, single or sharded)."),
    adapters: List[Path] = typer.Argument(..., help="PEFT adapter folder(s), applied/combined in order."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: merged-<base>-<adapter>-<sha8>-<dtype> beside the base)."),
    dtype: str = typer.Option("auto", help="auto|bfloat16|float16|float32 (auto keeps each tensor's dtype)."),
    combine: str = typer.Option("sequential", help="sequential|linear|ties|dare_linear|dare_ties"),
    weights: Optional[str] = typer.Option(None, help="Per-adapter weights for combine, e.g. 0.7,0.3."),
    density: float = typer.Option(0.5, help="Share of delta entries kept by ties/dare."),
    seed: int = typer.Option(0, help="Seed for DARE's random drop."),
    qlora_base: str = typer.Option("original", help="original|nf4: merge into W or into dequant(quant_nf4(W))."),
    shard_size: str = typer.Option("2GB", help="Maximum output shard size."),
    device: str = typer.Option("cpu", help="cpu|cuda: where the merge math runs."),
    precise: bool = typer.Option(False, "--precise", help="Compute deltas in float64."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Load .bin adapters with torch.load(weights_only=True)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Merge LoRA adapter(s) into a base checkpoint, exactly, streaming tensor by tensor."""
    from merger.io.early import EarlyBase, EarlyFiles

    # first, so the adapters' weights, and a first merge's base, are hashed on the second core while
    # the rest starts (and imports torch, ~1 s, unless the merge takes the torch-free path of
    # merger/core/fast.py)
    early_files = EarlyFiles.start([Path(a) / "adapter_model.safetensors" for a in adapters])
    early = EarlyBase.start(base)
    from merger.api import MergeOptions, merge, parse_weights

    options = MergeOptions(dtype=dtype, combine=combine, weights=parse_weights(weights), density=density, seed=seed,
                           qlora_base=qlora_base, shard_size=shard_size, device=device, precise=precise,
                           force=force, allow_pickle=allow_pickle)
    if quiet:  # no bar: rich is not even imported (~20 ms of a 2 s merge)
        result = merge(base, list(adapters), out, options, early=early, early_files=early_files)
    else:
        result = _merge_with_bar(base, list(adapters), out, options, early, early_files)
    for note in result.notes:
        typer.echo(f"note: {note}", err=True)
    r = result.rounding
    typer.echo(f"merged {result.tensors_merged} tensors into {result.out} ({result.bytes_written / 1e9:.2f} GB) in "
               f"{result.seconds:.1f} s, peak memory {result.peak_rss_bytes / 2**20:.0f} MiB; "
               f"delta entries rounded away: {r['vanished_share']:.3%}, worst relative error {r['worst_rel_error']:.2e}")


def _merge_with_bar(base, adapters, out, options, early, early_files):
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    from merger.api import merge

    with Progress(TextColumn("merge"), BarColumn(), DownloadColumn(), TextColumn("{task.fields[tensors]} tensors"),
                  TimeRemainingColumn(), console=Console(stderr=True), transient=True) as bar:
        job = bar.add_task("merge", total=None, tensors=0)
        count = [0]

        def progress(name: str, done: int, total: int) -> None:
            count[0] += 1
            bar.update(job, completed=done, total=total, tensors=count[0])

        return merge(base, adapters, out, options, progress=progress, early=early, early_files=early_files)


def validate_command(
    base: Path = typer.Argument(..., help="The base checkpoint."),
    adapter: Path = typer.Argument(..., help="The adapter (run unmerged on the base, with PEFT)."),
    merged: Path = typer.Argument(..., help="The merged checkpoint to check."),
    eval_file: Optional[Path] = typer.Option(None, "--eval", help='JSONL: {"prompt": ..., "expected": ...}'),
    max_kl: float = typer.Option(0.01, "--max-kl", help="Largest mean KL(reference || merged) allowed."),
    min_agreement: float = typer.Option(0.95, "--min-agreement", help="Smallest greedy-token agreement allowed."),
    max_new_tokens: int = typer.Option(16, "--max-new-tokens"),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Check a merged model against adapter-on-base; exit 0 only within the thresholds."""
    from merger.validate import record_validation, validate

    report = validate(base, adapter, merged, eval_file, max_kl, min_agreement, max_new_tokens=max_new_tokens)
    record_validation(merged, report)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        acc = ""
        if report.reference_accuracy is not None:
            acc = f", exact match {report.reference_accuracy:.3f} (adapter) vs {report.candidate_accuracy:.3f} (merged)"
        typer.echo(f"{'PASS' if report.passed else 'FAIL'}: {report.prompts} prompts, logits max-abs diff "
                   f"{report.logits_max_abs_diff:.3g}, mean KL {report.mean_kl:.3g}, greedy agreement "
                   f"{report.greedy_agreement:.3f}{acc}" + (f" ({'; '.join(report.failures)})" if report.failures else ""))
    if not report.passed:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add this package's commands to the root app."""
    app.command("merge")(merge_command)
    app.command("validate")(validate_command)
