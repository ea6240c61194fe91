"""Exact resume: a training process killed with SIGKILL mid-run, then resumed, produces the same
per-step losses as an uninterrupted run with the same seed."""

import json
import os
import subprocess
import sys

import pytest

from lmforge.config import DataConfig
from lmforge.data.prepare import prepare
from tests.fixtures import HANG_S, finished_output, sigkill_after, train_losses

ARGS = ["model.preset=gpt2-tiny", "model.n_layer=2", "model.block_size=32", "model.dropout=0.1",
        "train.batch_size=8", "train.max_steps=60", "train.log_interval=1", "train.ckpt_interval=10",
        "train.eval_interval=25", "train.eval_batches=2", "train.keep_last=2", "sample.num_samples=0",
        "optim.warmup_steps=5", "train.precision=fp32"]
# train.precision=fp32, not auto: auto times bf16 against fp32 on this host, and two runs timing at once on a busy
# machine can choose differently (measured here on one model: bf16 1.24x fp32 in one session, 3.3x in another;
# auto picks bf16 from 1.2x).
ENCODER = ["model.arch=encoder", "model.post_norm=true", "model.type_vocab_size=2", "model.pooler=true"]
"""The same model as a BERT-shaped encoder: masked-LM batches, whose masks must replay exactly too."""
ARCHS = [pytest.param([], id="decoder"), pytest.param(ENCODER, id="encoder")]


def _train(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "lmforge", "train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _records(run_dir) -> list[dict]:
    """metrics.jsonl without what depends on the clock (time, tokens/s, MFU)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("time_s", "tokens_per_s", "mfu")} for r in records]


@pytest.mark.parametrize("arch", [ARCHS[0], pytest.param(ENCODER, id="encoder", marks=pytest.mark.slow)])
def test_sigkill_then_resume_gives_identical_train_losses(dataset, tmp_path, arch):
    ref_dir, killed_dir = tmp_path / "ref", tmp_path / "killed"
    ref = _train([f"data.dataset_dir={dataset}", f"out_dir={ref_dir}", *ARGS, *arch])

    proc = _train([f"data.dataset_dir={dataset}", f"out_dir={killed_dir}", *ARGS, *arch])
    # Kill between checkpoints: after step 15 is logged, the latest checkpoint is step 10.
    sigkill_after(proc, killed_dir / "metrics.jsonl", 15)
    killed_steps = max(train_losses(killed_dir))
    assert 15 <= killed_steps < 60

    assert "resuming from" in finished_output(_train(["--resume", str(killed_dir)]))
    finished_output(ref)

    ref_losses, resumed_losses = train_losses(ref_dir), train_losses(killed_dir)
    assert sorted(resumed_losses) == list(range(1, 61))
    assert resumed_losses == ref_losses  # bit-exact, every step, before and after the kill
    assert ref_losses[60] < ref_losses[1]


@pytest.mark.parametrize("arch", ARCHS)
def test_a_resumed_run_logs_line_for_line_what_an_uninterrupted_one_does(dataset, tmp_path, arch):
    # Checkpoints every 10 steps, log lines every 4: the checkpoint at 10 falls inside the window 9-12,
    # whose line must still average all four steps after a resume.
    args = [f"data.dataset_dir={dataset}", *ARGS, *arch, "train.max_steps=24", "train.log_interval=4",
            "train.eval_interval=8"]
    ref = _train([*args, f"out_dir={tmp_path / 'ref'}"])
    killed = tmp_path / "killed"
    env = {**os.environ, "LMFORGE_FAULT": "mid_step:14"}  # dies in step 14: resumes from step 10
    crash = subprocess.run([sys.executable, "-m", "lmforge", "train", *args, f"out_dir={killed}"], env=env,
                           capture_output=True, timeout=HANG_S)
    assert crash.returncode == -9
    finished_output(_train(["--resume", str(killed)]))
    finished_output(ref)
    expected = _records(tmp_path / "ref")
    assert [r["step"] for r in expected if r["kind"] == "train"] == [4, 8, 12, 16, 20, 24]
    assert _records(killed) == expected  # losses, lr, grad norms, evaluations: every line


def test_resume_refuses_a_dataset_prepared_again_with_other_content(tmp_path):
    from lmforge.config import load_train_config
    from lmforge.errors import UserError
    from lmforge.training.pretrain import train

    src = tmp_path / "corpus.txt"
    src.write_text("the first text, repeated. " * 400)
    data = tmp_path / "ds"
    prepare(DataConfig(sources=[str(src)], tokenizer="char", val_fraction=0.1), data, progress=False)
    args = [f"data.dataset_dir={data}", f"out_dir={tmp_path / 'run'}", *ARGS, "train.max_steps=10"]
    train(load_train_config(None, args), progress=False)
    src.write_text("repeated text, the first. " * 300)  # other content, the same characters
    prepare(DataConfig(sources=[str(src)], tokenizer="char", val_fraction=0.1), data, progress=False, overwrite=True)
    resume = [*args[:-1], "train.max_steps=12"]
    with pytest.raises(UserError, match="changed since the run started.*--allow-data-change"):
        train(load_train_config(None, resume), resume=True, progress=False)
    with pytest.warns(UserWarning, match="changed since the run started.*resuming on it"):
        assert train(load_train_config(None, resume), resume=True, progress=False, allow_data_change=True).step == 12
    # The override is recorded: config.yaml says what the run trained to.
    assert load_train_config(tmp_path / "run" / "config.yaml").train.max_steps == 12


def test_the_time_limit_counts_this_process_so_a_resume_gets_as_long_again(dataset, tmp_path, monkeypatch):
    from lmforge.config import load_train_config
    from lmforge.training import session
    from lmforge.training.pretrain import train

    args = [f"data.dataset_dir={dataset}", f"out_dir={tmp_path / 'run'}", *ARGS, "train.max_steps=10"]
    train(load_train_config(None, [*args, "train.max_steps=5"]), progress=False)
    restore = session.load_trainer_state

    def after_a_long_first_process(ckpt, optimizer):
        state = restore(ckpt, optimizer)
        state.train_time_s += 3600.0  # as if the first process had trained for an hour
        return state

    monkeypatch.setattr(session, "load_trainer_state", after_a_long_first_process)
    result = train(load_train_config(None, [*args, "train.max_minutes=30"]), resume=True, progress=False)
    assert result.step == 10  # the 30 minutes are this process's: it trains on to max_steps
