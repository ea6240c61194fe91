"""Fixtures every test gets: an isolated cache directory. Shared helpers live in tests/fixtures.py."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep the user's ~/.cache out of tests; the measured GEMM peak is shared across tests."""
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
