from pathlib import Path

from deploy.core.routes import initial_routes, merged_route
from switchyard.config import parse_config

CONFIG = """
[base]
model = "base"
name = "b"
[[adapters]]
name = "x"
path = "ad/x"
[[adapters]]
name = "y"
path = "ad/y"
"""


def test_initial_routes_restore_merged_only_when_the_artifact_exists(tmp_path: Path):
    cfg = parse_config(CONFIG, source=tmp_path / "s.toml")
    art = tmp_path / "art"
    art.mkdir()
    (art / "config.json").write_text("{}")
    routes, engines = initial_routes(cfg, {"x": art, "y": tmp_path / "gone"})
    by_name = {r.name: r for r in routes}
    assert by_name["b"].mode == "base" and by_name["b"].upstream == "base"
    assert by_name["x"] == merged_route("x") and by_name["x"].upstream_model == "x-merged"
    assert by_name["y"].mode == "adapter" and by_name["y"].upstream_model == "y"
    assert [(e.route, e.model) for e in engines] == [("x", art)]
