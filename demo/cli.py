"""`switchyard demo build`: the demo base model, adapters, eval sets and deployment file."""

from __future__ import annotations

import json
from pathlib import Path

import typer

demo_app = typer.Typer(help="The demo model and adapters everything else is tested against.",
                       no_args_is_help=True)


@demo_app.command("build")
def build(
    root: Path = typer.Option(Path("artifacts/demo"), "--out", help="Folder to build into."),
    force: bool = typer.Option(False, "--force", help="Rebuild even when the recipe is unchanged."),
) -> None:
    """Train the demo base and LoRA adapters (cached: a no-op when the recipe is unchanged)."""
    from rich.console import Console

    from demo.build import ensure_demo, is_up_to_date
    from demo.report import BuildReport, weak_adapters

    console = Console()
    if not force and is_up_to_date(root):
        console.print(f"demo is up to date: {root}")
        _print_report(console, root, BuildReport)
        return
    ensure_demo(root, force=force, progress=lambda line: console.print(line, highlight=False))
    report = _print_report(console, root, BuildReport)
    if report is not None:
        for problem in weak_adapters(report):
            console.print(f"[yellow]warning:[/] {problem}")
    console.print(f"built {root} (deployment file: {root / 'switchyard.toml'})")


def _print_report(console, root: Path, report_cls):
    from rich.table import Table

    from demo.report import table_rows

    path = root / "report.json"
    if not path.is_file():
        return None
    report = report_cls.from_json(json.loads(path.read_text()))
    table = Table(title=f"demo: {report.parameters:,} parameters, built in {report.build_seconds:.0f} s")
    for column in ("task", "adapter", "eval items", "base", "adapter acc."):
        table.add_column(column)
    for row in table_rows(report):
        table.add_row(*row)
    console.print(table)
    return report


def register(app: typer.Typer) -> None:
    """Add the `demo` command group to the root app."""
    app.add_typer(demo_app, name="demo")
