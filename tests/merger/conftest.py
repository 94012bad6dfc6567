"""Keep the merger's base-hash cache out of the user's home during tests; the native kernel fixture."""

from __future__ import annotations

import pytest

from merger import native


@pytest.fixture(autouse=True)
def _private_hash_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg-cache"))


@pytest.fixture
def kernel():
    """merger/native's bf16 kernel (tests that need it skip where no C compiler builds it)."""
    fn = native.merge_bf16()
    if fn is None:
        pytest.skip(f"no native kernel here: {native.last_error}")
    return fn


@pytest.fixture
def lora_kernel(kernel):
    """merger/native's kernel that builds the delta from the LoRA factors (same library as `kernel`)."""
    return native.merge_lora_bf16()
