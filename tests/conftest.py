"""Session-wide fixtures: the demo artifacts and ONE real vLLM engine shared by every test that needs it.

The engine serves the demo base with both demo adapters preloaded under their stable names (as in
`artifacts/demo/switchyard.toml`), with runtime LoRA loading enabled.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from deploy.engines import Engine, EngineLaunch, free_port
from switchyard.config import DeploymentConfig, load_config

ROOT = Path(__file__).resolve().parent.parent
DEMO_DIR = Path(os.environ.get("SWITCHYARD_DEMO_DIR", ROOT / "artifacts" / "demo"))


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    """The built demo (`make test` builds it first; building here is the fallback)."""
    from demo.build import ensure_demo

    return ensure_demo(DEMO_DIR)


@pytest.fixture(scope="session")
def demo_config(demo_dir: Path) -> DeploymentConfig:
    return load_config(demo_dir / "switchyard.toml")


def base_engine_launch(config: DeploymentConfig, log_dir: Path) -> EngineLaunch:
    port = free_port()
    return EngineLaunch(
        model=config.base.model,
        served_name=config.base.name,
        port=port,
        enable_lora=True,
        max_lora_rank=config.engine.max_lora_rank,
        max_loras=config.engine.max_loras,
        lora_modules=tuple((a.name, a.path) for a in config.adapters),
        max_model_len=config.engine.max_model_len,
        kv_cache_gib=config.engine.kv_cache_gib,
        dtype=config.engine.dtype,
        extra_args=config.engine.extra_args,
        log_path=log_dir / f"engine-{port}.log",
    )


@pytest.fixture(scope="session")
def base_engine(demo_config: DeploymentConfig, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    """The demo base engine, adapters loaded; started once per session, stopped at the end."""
    launch = base_engine_launch(demo_config, tmp_path_factory.mktemp("engine-logs"))
    engine = Engine(launch).start(timeout_s=demo_config.engine.start_timeout_s)
    yield engine
    engine.stop()
