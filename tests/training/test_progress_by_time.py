"""A run whose log interval is many slow steps still prints a progress line about every 30 s, and only that:
metrics.jsonl keeps its train records at the log interval. Timed on the budget's fake clock (every step takes
exactly LMFORGE_FAKE_STEP_SECONDS), so the test decides by steps, never by the host's wall clock."""

import json
import re

from lmforge.config import load_train_config
from lmforge.testhooks import FAKE_STEP_SECONDS
from lmforge.training.pretrain import train


def test_a_slow_run_prints_a_progress_line_every_30_s_between_its_log_lines(dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(FAKE_STEP_SECONDS, "20")  # 20 s a step: 30 s pass every 2 steps, a log line every 25
    run = tmp_path / "run"
    cfg = load_train_config(overrides=[
        f"data.dataset_dir={dataset}", f"out_dir={run}", "model.preset=gpt2-tiny", "model.n_layer=1",
        "model.n_embd=32", "model.n_head=2", "model.block_size=16", "train.batch_size=2", "train.max_steps=8",
        "train.log_interval=25", "train.eval_interval=1000", "train.eval_batches=1", "train.ckpt_interval=1000",
        "sample.num_samples=0"])
    train(cfg)
    out = capsys.readouterr().out
    progress = [int(m) for m in re.findall(r"^step (\d+)/8 \| [\d,]+ tok/s \| ETA .* \| loss every 25 steps", out,
                                           re.MULTILINE)]
    assert progress == [2, 4, 6], out  # step 8, the last, prints the usual log line with its loss
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [8]  # no new metrics records
