"""A step with a NaN loss never reaches the optimizer: 'halt' stops with every checkpoint finite and
metrics.jsonl valid JSON; 'skip' leaves weights and optimizer state exactly as they were."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.config import load_train_config
from lmforge.errors import TrainingHalted
from lmforge.model.gpt import GPT
from lmforge.rundir import latest_checkpoint
from lmforge.train.loop import train

ARGS = ["model.preset=gpt2-tiny", "model.n_layer=2", "model.block_size=32", "train.batch_size=8",
        "train.log_interval=1", "train.eval_interval=1000", "train.eval_batches=1", "sample.num_samples=0",
        "optim.warmup_steps=2"]


@pytest.fixture
def nan_loss_at(monkeypatch):
    """Make the training loss NaN at the given steps (forward calls in training mode, from 1)."""
    def arm(steps: set[int]) -> None:
        original, calls = GPT.forward, [0]

        def forward(self, idx, targets=None, **kwargs):
            logits, loss = original(self, idx, targets, **kwargs)
            if self.training and targets is not None:
                calls[0] += 1
                if calls[0] in steps:
                    loss = loss * float("nan")
            return logits, loss

        monkeypatch.setattr(GPT, "forward", forward)
    return arm


def _strict_records(run: Path) -> list[dict]:
    def refuse(constant: str):
        raise ValueError(f"metrics.jsonl holds {constant}: not strict JSON")
    return [json.loads(line, parse_constant=refuse) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_halt_stops_before_the_bad_step_with_every_checkpoint_finite(dataset, tmp_path, nan_loss_at):
    nan_loss_at({7})
    cfg = load_train_config(None, [f"data.dataset_dir={dataset}", f"out_dir={tmp_path / 'run'}", *ARGS,
                                   "train.max_steps=20", "train.ckpt_interval=5", "train.keep_last=1"])
    with pytest.raises(TrainingHalted, match="step 7: the loss is nan"):
        train(cfg, progress=False)
    ckpt = latest_checkpoint(tmp_path / "run")
    assert ckpt.name == "step_000005"
    assert all(torch.isfinite(t).all() for t in load_file(str(ckpt / "model.safetensors")).values())
    assert [r["step"] for r in _strict_records(tmp_path / "run") if r["kind"] == "train"] == list(range(1, 7))


def test_skip_leaves_weights_and_optimizer_state_bit_identical_and_halts_after_k_in_a_row(dataset, tmp_path,
                                                                                          nan_loss_at):
    nan_loss_at({7})
    run = tmp_path / "skip"
    cfg = load_train_config(None, [f"data.dataset_dir={dataset}", f"out_dir={run}", *ARGS, "train.max_steps=9",
                                   "train.ckpt_interval=1", "train.keep_last=0", "train.on_nonfinite=skip"])
    assert train(cfg, progress=False).step == 9
    before, after = (run / "checkpoints" / f"step_00000{s}" for s in (6, 7))
    for name in ("model.safetensors", "trainer.safetensors"):
        a, b = load_file(str(before / name)), load_file(str(after / name))
        for key in a:
            if not key.startswith("rng."):  # the RNG moved on; weights, Adam's moments and step counts did not
                assert torch.equal(a[key], b[key]), (name, key)
    assert any(key.endswith(".step") for key in a)  # (Adam's step counts are among the tensors compared)
    records = _strict_records(run)
    assert [r for r in records if r["kind"] == "skip"] == [{"step": 7, "kind": "skip", "reason": "the loss is nan"}]

    nan_loss_at({3, 4, 5})
    cfg = load_train_config(None, [f"data.dataset_dir={dataset}", f"out_dir={tmp_path / 'k'}", *ARGS,
                                   "train.max_steps=9", "train.on_nonfinite=skip", "train.max_nonfinite_steps=2"])
    with pytest.raises(TrainingHalted, match="step 5: .*3 in a row"):
        train(cfg, progress=False)


def test_the_command_line_halts_a_diverging_run_with_exit_3_and_one_line(dataset, tmp_path):
    result = subprocess.run([sys.executable, "-m", "lmforge", "train", f"data.dataset_dir={dataset}",
                             f"out_dir={tmp_path / 'run'}", *ARGS, "train.max_steps=30", "optim.lr=1e6"],
                            capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=300)
    assert result.returncode == 3, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "halted: step" in lines[0] and "optim.lr" in lines[0], result.stderr
    _strict_records(tmp_path / "run")
