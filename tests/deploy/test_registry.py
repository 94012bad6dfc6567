import sqlite3
from pathlib import Path

import pytest

from deploy.registry import Registry


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        self.t += 1
        return self.t


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry.open(tmp_path / "state" / "registry.sqlite", clock=Clock())


def make_artifact(registry: Registry, tmp_path: Path, name: str = "m1", fingerprint: str = "fp1"):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "switchyard.json").write_text("{}")
    return registry.add_artifact(path=folder, kind="merged", route="r", fingerprint=fingerprint,
                                 sha256="ab" * 32, provenance={"base": "x"})


def test_deployment_round_trip_records_previous_mode_and_events(registry, tmp_path):
    registry.set_deployment("r", "adapter", artifact=None, actor="serve", event="register")
    art = make_artifact(registry, tmp_path)
    dep = registry.set_deployment("r", "merged", artifact=art, actor="alice", event="promote",
                                  detail={"gate": {"kl": 0.01}})
    assert dep.mode == "merged" and dep.previous_mode == "adapter"
    assert dep.artifact is not None and dep.artifact.path == art.path
    events = registry.history("r")
    assert [e.kind for e in events] == ["register", "promote"]
    assert events[1].actor == "alice" and events[1].detail == {"gate": {"kl": 0.01}}
    assert registry.artifacts_in_use() == {art.path}


def test_find_artifact_ignores_deleted_folders(registry, tmp_path):
    art = make_artifact(registry, tmp_path)
    assert registry.find_artifact("fp1") == art
    (art.path / "switchyard.json").unlink()
    assert registry.find_artifact("fp1") is None
    assert registry.find_artifact("other") is None


def test_failed_transaction_leaves_last_good_state(registry, tmp_path, monkeypatch):
    registry.set_deployment("r", "adapter", artifact=None, actor="serve", event="register")

    def boom(*args, **kwargs):
        raise RuntimeError("crash mid-transaction")

    monkeypatch.setattr(Registry, "_event", staticmethod(boom))
    with pytest.raises(RuntimeError):
        registry.set_deployment("r", "merged", artifact=None, actor="x", event="promote")
    monkeypatch.undo()
    assert registry.deployment("r").mode == "adapter"
    assert [e.kind for e in registry.history("r")] == ["register"]


def test_registry_survives_reopen(tmp_path):
    path = tmp_path / "reg.sqlite"
    reg = Registry.open(path)
    reg.set_deployment("a", "merged", artifact=None, actor="t", event="promote")
    reg.close()
    again = Registry.open(path)
    assert again.deployment("a").mode == "merged"
    assert again.deployments()[0].route == "a"


def test_schema_mismatch_is_a_clear_error(tmp_path):
    from deploy.errors import RegistryError

    path = tmp_path / "reg.sqlite"
    Registry.open(path).close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value='99' WHERE key='schema'")
    conn.commit()
    conn.close()
    with pytest.raises(RegistryError, match="schema 99"):
        Registry.open(path)
