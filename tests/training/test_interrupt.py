"""Ctrl-C while training: the run stops at a step boundary with a checkpoint of that step and its loss
plot, says how to resume, and resuming gives every step's loss exactly as an uninterrupted run; a
second Ctrl-C quits at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from lmforge.training.signals import GracefulStop
from tests.fixtures import HANG_S, finished_output, train_losses

ARGS = ["model.preset=gpt2-tiny", "model.n_layer=2", "model.block_size=32", "model.dropout=0.1",
        "train.batch_size=8", "train.max_steps=40", "train.log_interval=1", "train.ckpt_interval=100",
        "train.eval_interval=20", "train.eval_batches=2", "sample.num_samples=0", "optim.warmup_steps=5",
        "train.threads=1", "train.precision=fp32"]
# train.precision=fp32, not auto: auto times bf16 against fp32 on this host, and two runs timing at once on a busy
# machine can choose differently (measured here on one model: bf16 1.24x fp32 in one session, 3.3x in another;
# auto picks bf16 from 1.2x).


def _train(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lmforge", "train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_ctrl_c_saves_the_step_reached_and_a_resume_continues_exactly(dataset, tmp_path):
    ref = _train([f"data.dataset_dir={dataset}", f"out_dir={tmp_path / 'ref'}", *ARGS])
    run = tmp_path / "run"
    # As `lmforge train | tee log`, then Ctrl-C, which ends tee too: the progress lines of the steps left meet a
    # closed pipe. (stderr goes to a file, to read the last line.)
    with open(tmp_path / "stderr", "w+") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "lmforge", "train", f"data.dataset_dir={dataset}",
                                 f"out_dir={run}", *ARGS], stdout=subprocess.PIPE, stderr=stderr,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + HANG_S
        while not ((run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= 7):
            assert time.monotonic() < deadline and proc.poll() is None, (tmp_path / "stderr").read_text()
            time.sleep(0.01)
        proc.stdout.close()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=HANG_S)
        stderr.seek(0)
        err = stderr.read()
    assert proc.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert "stopped at step" in last and f"--resume {run}" in last and "Traceback" not in err, err
    stopped_at = max(train_losses(run))
    assert 7 <= stopped_at < 40  # between the regular checkpoints (every 100 steps): saved for the signal
    assert (run / "checkpoints" / f"step_{stopped_at:06d}").is_dir() and (run / "loss.png").is_file()
    finished_output(_train(["--resume", str(run)]))
    finished_output(ref)
    assert train_losses(run) == train_losses(tmp_path / "ref")


def test_the_first_signal_is_a_request_and_the_second_quits_at_once():
    before = signal.getsignal(signal.SIGINT)
    with GracefulStop() as stop:
        assert stop.requested is None
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # (the handler runs at the next bytecode boundary)
        assert stop.requested == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is before
