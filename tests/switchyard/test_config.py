from pathlib import Path

import pytest

from switchyard.config import load_config, parse_config
from switchyard.errors import ConfigError

GOOD = """
[base]
model = "base"
name = "demo-base"

[engine]
max_lora_rank = 8

[[adapters]]
name = "demo-reverse"
path = "adapters/reverse"
eval = "eval/reverse.jsonl"
"""


def test_paths_resolve_against_the_config_folder(tmp_path: Path):
    cfg = parse_config(GOOD, source=tmp_path / "switchyard.toml")
    assert cfg.base.model == (tmp_path / "base").resolve()
    assert cfg.adapters[0].path == (tmp_path / "adapters/reverse").resolve()
    assert cfg.gateway.state_dir == (tmp_path / "state").resolve()
    assert cfg.engine.max_lora_rank == 8 and cfg.engine.max_loras == 4
    assert cfg.adapter("demo-reverse").eval.name == "reverse.jsonl"


def test_missing_key_names_the_key(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"key 'base'.*required|key 'base': Field required"):
        parse_config("[engine]\nmax_loras = 2\n", source=tmp_path / "s.toml")


def test_wrong_type_names_key_and_value(tmp_path: Path):
    with pytest.raises(ConfigError) as err:
        parse_config(GOOD.replace("max_lora_rank = 8", "max_lora_rank = 'big'"), source=tmp_path / "s.toml")
    assert "engine.max_lora_rank" in err.value.problem and "'big'" in err.value.problem


def test_unknown_key_is_refused(tmp_path: Path):
    with pytest.raises(ConfigError, match="engine.max_lora_rnak"):
        parse_config(GOOD.replace("max_lora_rank", "max_lora_rnak"), source=tmp_path / "s.toml")


def test_duplicate_names_and_unknown_adapter(tmp_path: Path):
    with pytest.raises(ConfigError, match="repeated: demo-base"):
        parse_config(GOOD.replace('name = "demo-reverse"', 'name = "demo-base"'), source=tmp_path / "s.toml")
    cfg = parse_config(GOOD, source=tmp_path / "s.toml")
    with pytest.raises(ConfigError, match="known adapters: demo-reverse"):
        cfg.adapter("nope")


def test_bad_toml_and_missing_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse_config("[base\n", source=tmp_path / "s.toml")
    with pytest.raises(ConfigError, match="does not exist") as err:
        load_config(tmp_path / "nope.toml")
    assert "--config" in err.value.hint
