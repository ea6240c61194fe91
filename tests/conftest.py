"""Shared fixtures: tiny configs and models, and an isolated cache directory."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

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


def sigkill_after(proc: subprocess.Popen, metrics: Path, n_lines: int, timeout: float = 120) -> None:
    """SIGKILL a training process once its metrics.jsonl has ``n_lines`` records (mid-run, between
    checkpoints); fails if the run ends first."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n_lines:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"


def finished_output(proc: subprocess.Popen, timeout: float = 300) -> str:
    """The output of a process that must end successfully."""
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


def train_losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss from a run's metrics.jsonl (each step recorded once)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert steps == sorted(set(steps)), "metrics.jsonl must hold each step once"
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}
