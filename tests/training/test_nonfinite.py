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
from lmforge.training.guard import NonfiniteGuard
from lmforge.training.pretrain import train
from tests.fixtures import HANG_S

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


def test_halt_found_at_a_later_log_point_names_the_bad_step_and_saves_nothing_after_it(dataset, tmp_path,
                                                                                       nan_loss_at):
    nan_loss_at({7})  # found where the loop next reads the device: the checkpoint at step 8
    cfg = load_train_config(None, [f"data.dataset_dir={dataset}", f"out_dir={tmp_path / 'run'}", *ARGS,
                                   "train.max_steps=20", "train.log_interval=10", "train.ckpt_interval=4"])
    with pytest.raises(TrainingHalted, match="step 7: the loss is nan"):
        train(cfg, progress=False)
    assert latest_checkpoint(tmp_path / "run").name == "step_000004"


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
                            capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=HANG_S)
    assert result.returncode == 3, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "halted: step" in lines[0] and "optim.lr" in lines[0], result.stderr
    _strict_records(tmp_path / "run")


def _guarded_steps(fused: bool, bad_steps: set[int], n: int, on_nonfinite="skip", max_in_a_row=10):
    """n steps of a small model through a NonfiniteGuard, the gradients made NaN at ``bad_steps``; returns
    the guard, the model and optimizer, and a snapshot (weights and optimizer state) after every step."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, fused=fused)
    guard = NonfiniteGuard(opt, on_nonfinite, max_in_a_row, torch.device("cpu"))
    snapshots = []
    for step in range(1, n + 1):
        loss = model(torch.randn(4, 8)).pow(2).mean()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if step in bad_steps:
            loss = loss * float("inf") if step % 2 else loss
            norm = norm * float("nan")
        guard.step(step, loss, norm)
        opt.zero_grad(set_to_none=True)
        snapshots.append(([p.detach().clone() for p in model.parameters()],
                          [t.clone() for s in opt.state.values() for t in s.values()]))
    return guard, snapshots


@pytest.mark.parametrize("fused", [True, False])
def test_the_guard_leaves_a_bad_step_without_effect_and_reports_it_only_when_settled(fused):
    guard, snaps = _guarded_steps(fused, {3, 4}, 6)
    assert guard.on_device == fused  # fused AdamW reads found_inf: no host check per step
    for before, after in ((snaps[1], snaps[2]), (snaps[2], snaps[3])):  # steps 3 and 4 changed nothing
        assert all(torch.equal(a, b) for a, b in zip(before[0] + before[1], after[0] + after[1], strict=True))
    assert not torch.equal(snaps[3][0][0], snaps[4][0][0])  # step 5 trained again
    assert [(s.step, s.reason, s.in_a_row) for s in guard.settle()] == [
        (3, "the loss is inf", 1), (4, "the gradient norm is nan", 2)]
    assert guard.settle() == []  # reported once


def test_the_guard_halts_at_the_first_bad_step_or_the_one_too_many_in_a_row_across_settles():
    guard, _ = _guarded_steps(True, {5}, 8, on_nonfinite="halt")
    with pytest.raises(TrainingHalted, match=r"^step 5: the loss is inf \(1 in a row\)"):
        guard.settle()
    guard, _ = _guarded_steps(True, {2, 3}, 3, max_in_a_row=2)
    assert len(guard.settle()) == 2
    guard._rows[0] = torch.tensor([float("nan"), 1.0])  # a third bad step, after the settle
    guard._count, guard._first_step = 1, 4
    with pytest.raises(TrainingHalted, match=r"^step 4: the loss is nan \(3 in a row\)"):
        guard.settle()


def test_training_reads_the_device_only_where_it_logs_evaluates_or_saves(dataset, tmp_path, monkeypatch):
    reads = []

    def counting(read):
        def counted(self, *args, **kwargs):
            reads.append(1)
            return read(self, *args, **kwargs)
        return counted

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, counting(getattr(torch.Tensor, name)))
    cfg = load_train_config(None, [f"data.dataset_dir={dataset}", f"out_dir={tmp_path / 'run'}", *ARGS,
                                   "train.max_steps=40", "train.log_interval=20", "train.ckpt_interval=40"])
    train(cfg, progress=False)
    assert len(reads) <= 6, f"{len(reads)} reads of device values in 40 steps with 2 log points and 1 evaluation"
