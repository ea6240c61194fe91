"""One writer per run directory: a second process training into a run that is being written is refused, with the
holder's PID, before it writes anything; the lock dies with its holder. A folder that is not a run is never
written into, and a resume that would end before the step it reached changes nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge import rundir
from lmforge.config import load_train_config
from lmforge.errors import UserError
from lmforge.training.pretrain import train
from tests.fixtures import HANG_S

ARGS = ["model.preset=gpt2-tiny", "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.block_size=16",
        "train.batch_size=2", "train.max_steps=3", "train.eval_interval=100", "train.eval_batches=1",
        "sample.num_samples=0", "train.threads=1", "train.precision=fp32"]


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` and its bytes, the lock's PID aside."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != rundir.LOCK}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dataset) -> Path:
    """A finished 3-step run."""
    run = tmp_path_factory.mktemp("lock") / "run"
    train(load_train_config(None, [f"data.dataset_dir={dataset}", f"out_dir={run}", *ARGS]), progress=False)
    return run


class _Holder:
    """Another process holding a run directory's lock until it is killed (as a training process would)."""

    def __init__(self, run_dir: Path):
        code = "import sys; from lmforge import rundir; rundir.lock(sys.argv[1], create=True); print('held', " \
               "flush=True); sys.stdin.read()"
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline() == "held\n"

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(timeout=HANG_S) == -signal.SIGKILL
        self.proc.stdin.close()
        self.proc.stdout.close()


def test_a_second_writer_is_refused_with_the_holders_pid_until_the_holder_dies(trained, dataset, tmp_path):
    before = _files(trained)
    holder = _Holder(trained)
    try:
        resume = load_train_config(trained / rundir.CONFIG, ["train.max_steps=5"])
        with pytest.raises(rundir.RunLocked, match=f"'{trained}' is being written by process {holder.proc.pid}"):
            train(resume, resume=True, progress=False)
        assert _files(trained) == before  # nothing written, not even config.yaml's new max_steps
        fresh = load_train_config(None, [f"data.dataset_dir={dataset}", f"out_dir={trained}", *ARGS])
        with pytest.raises(rundir.RunLocked, match=f"'{trained}' is being written by process {holder.proc.pid}"):
            train(fresh, progress=False)  # not beside it in run-2 either: two trainings into one out_dir at once
        assert sorted(p.name for p in trained.parent.iterdir()) == ["run"]
        new = tmp_path / "new"
        other = _Holder(new)  # a run being created: train into the same out_dir at once
        with pytest.raises(rundir.RunLocked, match=f"'{new}' is being written by process {other.proc.pid}"):
            train(load_train_config(None, [f"data.dataset_dir={dataset}", f"out_dir={new}", *ARGS]), progress=False)
        assert sorted(p.name for p in new.iterdir()) == [rundir.LOCK]
        other.kill()
    finally:
        holder.kill()
    # The lock died with its holder (SIGKILL): nothing stale is left to clear.
    with rundir.lock(trained):
        with rundir.lock(trained):  # re-entrant: a command holding it may call train() on the run
            pass
        assert (trained / rundir.LOCK).read_text().strip() == str(os.getpid())


def test_out_dir_holding_something_else_is_refused_and_left_as_it_was(dataset, tmp_path):
    hf = tmp_path / "gpt2"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "tokenizer.json").write_text("{}")
    with pytest.raises(UserError, match=f"out_dir '{hf}' is not an lmforge run and not empty "
                                        r"\(it holds config.json, tokenizer.json\): nothing was written"):
        train(load_train_config(None, [f"data.dataset_dir={dataset}", f"out_dir={hf}", *ARGS]), progress=False)
    assert sorted(p.name for p in hf.iterdir()) == ["config.json", "tokenizer.json"]
    assert (hf / "tokenizer.json").read_text() == "{}"


def test_a_run_that_fails_before_writing_leaves_no_folder_behind(tmp_path):
    cfg = load_train_config(None, [f"data.dataset_dir={tmp_path / 'no-data'}", f"out_dir={tmp_path / 'a/b/run'}",
                                   *ARGS])
    with pytest.raises(UserError):
        train(cfg, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_resume_below_the_step_reached_says_so_and_changes_nothing(trained):
    before = _files(trained)
    with pytest.raises(UserError, match=r"train.max_steps=2 is below the step it reached \(3\); nothing was changed"):
        train(load_train_config(trained / rundir.CONFIG, ["train.max_steps=2"]), resume=True, progress=False)
    assert _files(trained) == before
