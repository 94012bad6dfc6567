from pathlib import Path

import pytest

from deploy.artifacts import fingerprint, publish, remove_unused, tree_sha256
from deploy.errors import DeployError


def folder(tmp_path: Path, name: str, files: dict[str, bytes]) -> Path:
    d = tmp_path / name
    d.mkdir()
    for k, v in files.items():
        (d / k).write_bytes(v)
    return d


def test_fingerprint_changes_with_adapter_bytes_and_options(tmp_path):
    base = folder(tmp_path, "base", {"model.safetensors": b"w", "config.json": b"{}"})
    ad = folder(tmp_path, "ad", {"adapter_model.safetensors": b"a", "adapter_config.json": b"{}"})
    fp = fingerprint(base, ad, {"quantize": "awq"})
    assert fp == fingerprint(base, ad, {"quantize": "awq"})
    assert fp != fingerprint(base, ad, {"quantize": "none"})
    (ad / "adapter_model.safetensors").write_bytes(b"b")
    assert fp != fingerprint(base, ad, {"quantize": "awq"})


def test_publish_is_a_rename_and_refuses_to_overwrite(tmp_path):
    staged = folder(tmp_path, "staged", {"model.safetensors": b"x"})
    digest = tree_sha256(staged)
    final = publish(staged, tmp_path / "arts" / "m")
    assert not staged.exists() and tree_sha256(final) == digest
    again = folder(tmp_path, "staged2", {"model.safetensors": b"y"})
    with pytest.raises(DeployError, match="already exists"):
        publish(again, final)


def test_remove_unused_never_deletes_what_is_in_use(tmp_path):
    live = folder(tmp_path, "live", {"a": b"1"})
    old = folder(tmp_path, "old", {"a": b"1"})
    assert remove_unused(live, {live}) is False and live.exists()
    assert remove_unused(old, {live}) is True and not old.exists()
