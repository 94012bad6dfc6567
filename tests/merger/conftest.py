"""Keep the merger's base-hash cache out of the user's home during tests."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _private_hash_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg-cache"))
