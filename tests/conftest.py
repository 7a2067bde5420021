"""Fixtures; the helpers the tests share are in testing_utils.py."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # an accidental hub call fails fast instead of hanging

import pytest  # noqa: E402


@pytest.fixture
def tmp_hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache in offline mode for Hub tests."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache
