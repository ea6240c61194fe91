"""train.budget_minutes: the step count fitted to the measured pace, the schedule completed, the plan kept."""

import json
import os
import signal
import subprocess
import sys

import pytest

from lmforge.config import TrainLoopConfig, load_train_config
from lmforge.testhooks import FAKE_STEP_SECONDS
from lmforge.training.budget import plan_steps
from lmforge.training.optim import lr_at
from tests.fixtures import train_losses

ARGS = ["model.preset=gpt2-tiny", "model.n_layer=2", "model.block_size=32", "train.batch_size=8",
        "train.max_steps=100000", "train.log_interval=5", "train.eval_interval=1000", "train.eval_batches=2",
        "train.ckpt_interval=20", "sample.num_samples=0", "optim.warmup_steps=5", "optim.min_lr=1e-5"]


def test_the_plan_fills_the_budget_with_the_evaluations_counted():
    tc = TrainLoopConfig(max_steps=10_000, eval_interval=100, eval_batches=30, grad_accum=1)
    # 60 s left at 0.1 s/step, each step also paying 30 * 1/3 / 100 = 10% of an evaluation: 545 more steps.
    assert plan_steps(70.0, 10.0, 11, 0.1, tc) == 11 + 545
    assert plan_steps(70.0, 10.0, 11, 0.1, TrainLoopConfig(max_steps=300)) == 300  # the cap
    assert plan_steps(5.0, 10.0, 11, 0.1, tc) == 12  # over budget already: one more step ends the schedule


def test_a_budgeted_run_plans_its_steps_ends_its_schedule_and_a_resume_keeps_the_plan(dataset, tmp_path):
    run = tmp_path / "run"
    args = [f"data.dataset_dir={dataset}", f"out_dir={run}", *ARGS, "train.budget_minutes=0.1"]
    # The plan reads a clock on which each step takes 0.1 s (the budget's test hook), not the host's: at step 11,
    # 1.1 s spent and 4.9 s left at 0.1 s/step (+0.07% for the evaluations) plan 11 + 48 = 59 steps on any host,
    # however fast or loaded, so the fault in step 30 always comes before the end.
    env = {**os.environ, FAKE_STEP_SECONDS: "0.1"}
    crash = subprocess.run([sys.executable, "-m", "lmforge", "train", *args], capture_output=True, text=True,
                           env={**env, "LMFORGE_FAULT": "mid_step:30"})  # dies in step 30, after the plan (step 11)
    assert crash.returncode == -signal.SIGKILL, crash.stdout + crash.stderr
    assert "step 11: 0.100 s/step, so 59 steps fill the 0.1 min budget" in crash.stdout
    assert "cpu fp32 (auto: bf16 " in crash.stdout or "cpu bf16 (auto: bf16 " in crash.stdout  # why, measured
    planned = json.loads((run / "checkpoints" / "step_000020" / "trainer.json").read_text())["planned_steps"]
    assert planned == 59
    out = subprocess.run([sys.executable, "-m", "lmforge", "train", "--resume", str(run)], capture_output=True,
                         text=True, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "steps fill the" not in out.stdout  # the plan carried on (revised, perhaps), not made afresh
    final = json.loads((sorted((run / "checkpoints").glob("step_*"))[-1] / "trainer.json").read_text())
    assert max(train_losses(run)) == final["step"] == final["planned_steps"] == 59
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r["kind"] == "train"][-1]
    optim = load_train_config(run / "config.yaml").optim
    # The schedule's last step is the planned one: its decay ends there, at the floor.
    assert last["lr"] == pytest.approx(lr_at(final["step"] - 1, optim, final["step"]))
    assert last["lr"] < 0.1 * optim.lr  # the default WSD: the last of 0.3 x 59 = 18 decay steps is at 1/17 of the peak
