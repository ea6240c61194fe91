"""A storage failure while writing a checkpoint (here a file-size limit, as a full disk would fail):
one line naming the checkpoint, the error and the free space, exit 1, no temporary directory left,
the previous checkpoint intact, and a later resume as exact as ever."""

import os
import resource
import subprocess
import sys

from tests.fixtures import HANG_S, train_losses

ARGS = ["model.preset=gpt2-tiny", "model.n_layer=2", "model.block_size=32", "train.batch_size=8",
        "train.log_interval=1", "train.ckpt_interval=10", "train.eval_interval=1000", "train.eval_batches=1",
        "sample.num_samples=0", "optim.warmup_steps=5", "optim.decay_steps=30",
        "optim.name=adamw"]  # AdamW: an optimizer state of exactly two moments per weight (see below)


def _train(args: list[str], file_limit: int | None = None) -> subprocess.CompletedProcess:
    def limit() -> None:  # a write past the limit fails with EFBIG (Python ignores SIGXFSZ)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

    return subprocess.run([sys.executable, "-m", "lmforge", "train", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=HANG_S,
                          preexec_fn=limit if file_limit else None)


def test_a_checkpoint_that_cannot_be_written_is_one_line_exit_1_and_loses_nothing(dataset, tmp_path):
    run, ref = tmp_path / "run", tmp_path / "ref"
    first = _train([f"data.dataset_dir={dataset}", f"out_dir={run}", "train.max_steps=10", *ARGS])
    assert first.returncode == 0, first.stderr
    weights = (run / "checkpoints" / "step_000010" / "model.safetensors").stat().st_size
    # The optimizer state file is twice the weights: a limit between the two fails every checkpoint.
    failed = _train(["--resume", str(run), "train.max_steps=30"], file_limit=int(weights * 1.5))
    assert failed.returncode == 1, failed.stdout + failed.stderr
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in failed.stderr, failed.stderr
    assert "writing checkpoint" in lines[0] and "step_000020" in lines[0] and "File too large" in lines[0]
    assert "free" in lines[0]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_000010"]
    # Nothing lost: resuming without the limit reproduces an uninterrupted run exactly.
    assert _train(["--resume", str(run), "train.max_steps=30"]).returncode == 0
    assert _train([f"data.dataset_dir={dataset}", f"out_dir={ref}", "train.max_steps=30", *ARGS]).returncode == 0
    assert train_losses(run) == train_losses(ref)
