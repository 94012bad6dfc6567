"""`switchyard serve | promote | rollback | status | history`."""

from __future__ import annotations

import getpass
import json
import time
from pathlib import Path

import typer

CONFIG = typer.Option(..., "--config", "-c", help="the deployment's switchyard.toml")
URL = typer.Option(None, "--url", help="the serve process [default: gateway.host:port from the config]")


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_cmd)
    app.command("promote")(promote_cmd)
    app.command("rollback")(rollback_cmd)
    app.command("status")(status_cmd)
    app.command("history")(history_cmd)


def serve_cmd(config: Path = CONFIG,
              host: str = typer.Option(None, "--host", help="bind address [default: config, else 127.0.0.1]"),
              port: int = typer.Option(None, "--port", help="port [default: config, else 8000]")) -> None:
    """Start the engines and the gateway for CONFIG; restore routes from the registry; Ctrl-C stops all."""
    from deploy.serve import serve
    from switchyard.config import load_config

    serve(load_config(config), host, port)


def promote_cmd(name: str = typer.Argument(..., help="the stable model name to promote"),
                config: Path = CONFIG, url: str = URL,
                quantize: str = typer.Option(None, "--quantize", help="awq, none or auto [default: deploy.quantize]"),
                dry_run: bool = typer.Option(False, "--dry-run", help="check, build and gate; switch nothing"),
                max_kl: float = typer.Option(None, "--max-kl", help="override gates.max_kl for this promote"),
                max_accuracy_drop: float = typer.Option(None, "--max-accuracy-drop",
                                                        help="override gates.max_accuracy_drop"),
                timeout: float = typer.Option(1800, "--timeout", help="give up waiting after this many seconds")) -> None:
    """Merge, quantize, validate and hot-swap NAME from its adapter to a merged engine (zero downtime)."""
    from rich.console import Console

    from deploy.client import AdminClient
    from deploy.errors import PromoteError
    from switchyard.config import load_config

    if quantize not in (None, "awq", "none", "auto"):
        raise typer.BadParameter("--quantize must be awq, none or auto")
    console = Console(stderr=True)
    client = AdminClient(load_config(config), url)
    body = {"quantize": quantize, "dry_run": dry_run, "actor": _actor(), "max_kl": max_kl,
            "max_accuracy_drop": max_accuracy_drop}
    job = client.promote(name, **{k: v for k, v in body.items() if v is not None})
    console.print(f"promote {name}: job {job['id']}: {' → '.join(job['plan'])}")
    shown, deadline = 0, time.monotonic() + timeout
    with console.status(f"{job['plan'][0]}...") as spinner:
        while job["status"] == "running":
            if time.monotonic() > deadline:
                raise PromoteError(f"promote {name} still running after {timeout:.0f} s",
                                   f"check `switchyard status --config {config}`")
            time.sleep(0.5)
            job = client.job(job["id"])
            for step in job["done"][shown:]:
                console.print(f"  [green]✓[/] {step['step']:<9} {step['seconds']:>7.1f} s  {_brief(step['detail'])}")
            shown = len(job["done"])
            if job.get("current"):
                spinner.update(f"{job['current']}...")
    if job["status"] != "succeeded":
        console.print(f"  [red]✗[/] {job['failed_step']}")
        raise PromoteError(f"promote {name} failed at {job['failed_step']}: {job['error']}",
                           "routes are unchanged")
    verb = "validated (dry run, nothing switched)" if dry_run else "now served merged"
    console.print(f"promote {name}: {verb}")


def rollback_cmd(name: str = typer.Argument(..., help="the stable model name"), config: Path = CONFIG,
                 url: str = URL) -> None:
    """Route NAME back to its adapter on the base engine; the merged engine is drained and stopped."""
    from deploy.client import AdminClient
    from switchyard.config import load_config

    t0 = time.monotonic()
    result = AdminClient(load_config(config), url).rollback(name, _actor())
    typer.echo(f"rollback {name}: routed to the adapter in {time.monotonic() - t0:.2f} s "
               f"(switch {result['switched_in_s']:.3f} s); draining {result['retiring']}")


def status_cmd(config: Path = CONFIG, url: str = URL,
               as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """Routes, modes, engines (pid, port, health, in-flight) and artifacts in use."""
    from deploy.client import AdminClient
    from switchyard.config import load_config

    status = AdminClient(load_config(config), url).status()
    if as_json:
        typer.echo(json.dumps(status, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    routes = Table("route", "mode", "upstream", "engine model", "artifact", title="routes")
    for r in status["routes"]:
        routes.add_row(r["name"], r["mode"], r["upstream"], r["upstream_model"], r["artifact"] or "")
    engines = Table("engine", "pid", "port", "state", "in flight", "restarts", "model", title="engines")
    for name, e in status["engines"].items():
        engines.add_row(name, str(e["pid"]), str(e["port"]), str(e.get("state")), str(e.get("in_flight")),
                        str(e["restarts"]), e["model"])
    console = Console()
    console.print(routes)
    console.print(engines)
    for job in status["jobs"]:
        console.print(f"running: promote {job['route']} ({job['id']}) at {job['current']}")


def history_cmd(name: str = typer.Argument(None, help="a stable model name [default: all]"), config: Path = CONFIG,
                as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """Promotes, rollbacks and failures, oldest first, from the registry (serve need not be running)."""
    from datetime import datetime

    from deploy.errors import DeployError
    from deploy.registry import Registry
    from switchyard.config import load_config

    cfg = load_config(config)
    path = cfg.gateway.state_dir / "registry.sqlite"
    if not path.is_file():
        raise DeployError(f"no registry at {path}", f"run `switchyard serve --config {config}` first")
    events = Registry.open(path).history(name, limit=1000)
    if as_json:
        typer.echo(json.dumps([e.__dict__ for e in events], indent=2, default=str))
        return
    for e in events:
        when = datetime.fromtimestamp(e.at).strftime("%Y-%m-%d %H:%M:%S")
        typer.echo(f"{when}  {e.route:<16} {e.kind:<14} {e.actor:<12} {_brief(e.detail)}")


def _actor() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return "unknown"


def _brief(detail: dict) -> str:
    parts = []
    for k, v in detail.items():
        if isinstance(v, float):
            v = f"{v:.4g}"
        elif isinstance(v, dict):
            v = "{" + ", ".join(f"{a}={b:.4g}" if isinstance(b, float) else f"{a}={b}" for a, b in v.items()) + "}"
        parts.append(f"{k}={v}")
    return " ".join(parts)
