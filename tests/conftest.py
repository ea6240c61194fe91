"""Shared fixtures: tiny configs and models, and an isolated cache directory."""

from __future__ import annotations

import pytest
import torch

from lmforge.config import ModelConfig, from_dict
from lmforge.model.gpt import GPT


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep the user's ~/.cache out of tests; the measured GEMM peak is shared across tests."""
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def tiny_model(preset: str = "gpt2-tiny", **overrides) -> GPT:
    torch.manual_seed(0)
    cfg = from_dict(ModelConfig, {"preset": preset, "vocab_size": 97, "n_layer": 2, "block_size": 32,
                                  **overrides})
    return GPT(cfg).eval()
