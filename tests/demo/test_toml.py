from __future__ import annotations

from switchyard.config import parse_config

from demo.build import BASE_NAME, adapter_name
from demo.toml import deployment_toml


def test_deployment_file_parses_with_stable_names(tmp_path):
    text = deployment_toml(BASE_NAME, {adapter_name("reverse"): "reverse", adapter_name("sort"): "sort"}, "ab" * 32)
    config = parse_config(text, source=tmp_path / "switchyard.toml")
    assert config.base.name == "demo-base"
    assert config.base.model == (tmp_path / "base").resolve()
    assert [a.name for a in config.adapters] == ["demo-reverse", "demo-sort"]
    assert config.adapter("demo-sort").path == (tmp_path / "adapters" / "sort").resolve()
    assert config.adapter("demo-sort").eval == (tmp_path / "eval" / "sort.jsonl").resolve()
    assert config.engine.max_lora_rank == 8 and config.engine.max_loras == 4
    assert config.engine.max_model_len == 256 and config.engine.kv_cache_gib == 1
    assert config.gateway.adapters_root == (tmp_path / "adapters").resolve()
    assert config.gateway.state_dir == (tmp_path / "state").resolve()
