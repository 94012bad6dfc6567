"""`switchyard gateway`: serve a deployment's static routing table against engines already running.
(`switchyard serve`, which starts the engines too, is the deploy package's.)"""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Add this package's commands to the root app."""
    app.command("gateway")(gateway_command)


def gateway_command(
    config: Path = typer.Option(..., "--config", "-c", help="the deployment's switchyard.toml"),
    engine: str = typer.Option(..., "--engine", help="URL of the running base engine (adapters preloaded)"),
    merged: list[str] = typer.Option([], "--merged", help="NAME=URL: route NAME to a merged engine serving it"),
    host: str = typer.Option(None, "--host", help="bind address [default: config, else 127.0.0.1]"),
    port: int = typer.Option(None, "--port", help="port [default: config, else 8000]"),
) -> None:
    """Serve the OpenAI-compatible gateway for CONFIG in front of already-running engines."""
    import uvicorn

    from gateway.app import create_app, server_options
    from gateway.core.errors import GatewayError
    from gateway.core.routing import Route, config_routes
    from gateway.service import Gateway
    from gateway.settings import load_settings
    from switchyard.config import load_config

    cfg = load_config(config)
    settings = load_settings(cfg, host=host, port=port)
    gw = Gateway(settings)
    gw.add_upstream("base", engine, max_lora_rank=cfg.engine.max_lora_rank, base_model=cfg.base.model,
                    probe_model=cfg.base.name)
    table = config_routes(cfg, "base")
    for spec in merged:
        name, sep, url = spec.partition("=")
        if not sep or not name or not url.startswith("http"):
            raise GatewayError(f"--merged {spec!r} is not NAME=URL", "e.g. --merged demo-reverse=http://127.0.0.1:8002")
        gw.add_upstream(f"merged-{name}", url, probe_model=name)
        table = table.with_route(Route(name, f"merged-{name}", name, "merged"))
    gw.replace_table(table)
    typer.echo(f"switchyard gateway on http://{settings.host}:{settings.port} "
               f"({len(table)} routes: {', '.join(table.names())})")
    uvicorn.run(create_app(settings, gw), **server_options(settings))
