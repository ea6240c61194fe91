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
from lmforge.training.pretrain import train
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


def test_a_machine_too_slow_for_the_recipe_gets_a_schedule_that_still_ends_and_is_told_so(dataset, tmp_path,
                                                                                         monkeypatch, capsys):
    # On the fake clock each step takes 0.1 s: at step 11, 1.1 s spent and 1.9 s of the 3 s budget left plan
    # 11 + 18 = 29 steps, fewer than the recipe's 50 warmup steps (the loaded machine: 28 steps, warmup 50).
    monkeypatch.setenv(FAKE_STEP_SECONDS, "0.1")
    run = tmp_path / "run"
    cfg = load_train_config(overrides=[
        f"data.dataset_dir={dataset}", f"out_dir={run}", "model.preset=gpt2-tiny", "model.n_layer=1",
        "model.n_embd=32", "model.n_head=2", "model.block_size=16", "train.batch_size=2", "train.max_steps=100000",
        "train.log_interval=5", "train.eval_interval=1000", "train.eval_batches=1", "train.ckpt_interval=1000",
        "sample.num_samples=0", "optim.schedule=wsd", "optim.warmup_steps=50", "train.budget_minutes=0.05"])
    result = train(cfg)
    out = capsys.readouterr().out
    assert "step 11: 0.100 s/step, so 29 steps fill the 0.05 min budget" in out, out
    assert ("warning: 29 steps are too few for this recipe, under 3x its 50-step warmup (optim.warmup_steps), "
            "so the model will be poor. The warmup is cut to 9 steps") in out, out
    # 1.1 s + 489 more steps at 0.1 s: 50 s, 1 min
    assert out.count("warning: ") == 1 and "train.budget_minutes=1 makes ~500 steps" in out
    done = next(line for line in out.splitlines() if line.startswith("done: "))
    assert done.endswith("| too short for this recipe: 29 steps, under 3x its 50-step warmup (see the plan's warning)")
    assert result.step == 29
    lrs = {r["step"]: r["lr"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
           if r["kind"] == "train"}
    # Warmup and decay both inside the planned steps: before the plan the recipe's warmup (step 10 logs the lr of
    # step index 9: 10/51 of the peak); from the plan on, past the cut warmup of 9 steps, the peak, held through
    # WSD's stable phase; the decay (the last 30% of 20 steps) ends by the last step, near the floor.
    assert list(lrs) == [5, 10, 15, 20, 25, 29]
    assert lrs[10] == pytest.approx(cfg.optim.lr * 10 / 51) and lrs[15] == lrs[20] == cfg.optim.lr
    assert lrs[29] == pytest.approx(lr_at(28, cfg.optim, 29, 9)) and lrs[29] < lrs[25] < cfg.optim.lr
