"""`switchyard serve`: engines, then the gateway, in one process; stop everything on SIGINT/SIGTERM.

Order: open the registry, start the base engine (adapters preloaded) and any merged engines the
registry records as live, restore their routes, then serve the gateway (uvicorn). On a signal uvicorn
stops accepting, lets in-flight requests finish (the drain), and then running promotes are abandoned
(each cleans up after itself) and every engine is stopped.
"""

from __future__ import annotations

import asyncio
import logging
import signal

import uvicorn

from deploy.admin import build_router, switchyard_error_handler
from deploy.errors import DeployError, RollbackError
from deploy.keys import admin_key, client_keys
from deploy.registry import Registry
from deploy.service import Deployment, check_model_folder
from switchyard.config import ConfigError, DeploymentConfig

log = logging.getLogger("switchyard.deploy")


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s switchyard %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class _Server(uvicorn.Server):
    """uvicorn's Server, minus re-raising the captured SIGTERM/SIGINT after its shutdown: that would
    kill this process before it stops its engines. We stop them, then exit 0."""

    def handle_exit(self, sig, frame) -> None:
        super().handle_exit(sig, frame)
        self._captured_signals.clear()


def serve(config: DeploymentConfig, host: str | None = None, port: int | None = None) -> None:
    from gateway.app import create_app, server_options
    from gateway.service import Gateway
    from gateway.settings import load_settings

    check_model_folder(config.base.model, f"base.model in {config.source}")
    configure_logging()
    state = config.gateway.state_dir
    state.mkdir(parents=True, exist_ok=True)
    settings = load_settings(config, host=host, port=port, admin_key=admin_key(config, create=True),
                             api_keys=client_keys(config))
    registry = Registry.open(state / "registry.sqlite")
    gateway = Gateway(settings)
    deployment = Deployment(config, registry, gateway)

    # a signal during engine start-up must still stop what was started
    stop_requested = False

    def early_stop(signum, frame):
        nonlocal stop_requested
        stop_requested = True
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, early_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        log.info("serve: starting engines for %s", config.source)
        deployment.start_engines()
    except BaseException:
        deployment.supervisor.stop_all()
        registry.close()
        if stop_requested:
            log.info("serve: stopped during start-up")
            return
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)

    app = create_app(settings, gateway, extra_routers=[build_router(deployment)])
    app.add_exception_handler(ConfigError, switchyard_error_handler(404))
    app.add_exception_handler(RollbackError, switchyard_error_handler(409))
    app.add_exception_handler(DeployError, switchyard_error_handler(400))
    server = _Server(uvicorn.Config(app, **server_options(settings, config.deploy.drain_timeout_s)))

    async def main() -> None:
        await deployment.run_background()
        log.info("serve: gateway on http://%s:%d (%s)", settings.host, settings.port,
                 ", ".join(f"{r.name}={r.mode}" for r in gateway.table))
        try:
            await server.serve()
        finally:
            log.info("serve: shutting down (drained; stopping engines)")
            await deployment.shutdown()
            registry.close()
            log.info("serve: stopped")

    asyncio.run(main())
