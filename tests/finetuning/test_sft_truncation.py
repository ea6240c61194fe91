"""SFT examples whose answer truncation cut off entirely are dropped and counted: no batch is left without an
answer token to average its loss over (0/0 = NaN), with padding or packing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lmforge.config import load_finetune_config
from lmforge.data.tokenizer import Tokenizer
from lmforge.finetuning import sft
from lmforge.finetuning.finetune import finetune
from lmforge.runtime import setup_runtime
from tests.fixtures import tiny_model

TEXT = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 :#\n.,?!<>|_-'"
LONG = 4
"""Examples whose prompt alone fills the block: written first, so the first batches hold only them."""


def _write_task(folder: Path) -> tuple[Path, Path]:
    words = ["cat", "dog", "owl", "elk", "ant", "bee"]
    long = [{"prompt": "Repeat: " + "x" * 120, "response": w} for w in words[:LONG]]
    short = [{"prompt": f"Repeat: {w}", "response": w} for w in words]
    train, val = folder / "train.jsonl", folder / "val.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in long + short))
    val.write_text("".join(json.dumps(r) + "\n" for r in short[:2]))
    return train, val


@pytest.mark.parametrize("packing", [False, True])
def test_examples_with_no_answer_token_left_are_dropped_and_every_batch_loss_is_finite(tmp_path, packing):
    train, val = _write_task(tmp_path)
    tok = Tokenizer.train_char([TEXT])
    cfg = load_finetune_config(None, [f"base={tmp_path}", f"data.train={train}", f"data.val={val}",
                                      f"data.packing={packing}",
                                      "data.eval_generations=0", "train.batch_size=2"])
    task = sft.SFTTask(cfg, tiny_model(vocab_size=tok.vocab_size, block_size=64), tok, tmp_path, 64,
                       setup_runtime("cpu", "fp32"))
    for i in range(0, task.n_train, 2):
        loss = task.loss(task.model, task.batch(list(range(i, min(i + 2, task.n_train)))))
        assert math.isfinite(loss.item()), f"batch {i // 2}"
    assert f"{LONG} train examples with no answer token left dropped (e.g. {train}:1)" in "\n".join(task.summary)
    assert len(task.train) == 6 and all(any(t != sft.IGNORE for t in e.targets) for e in task.train)


@pytest.mark.slow  # ~3 s of fine-tuning on top of the base run; the test above covers the batches without it
def test_sft_with_prompts_that_fill_the_block_trains_with_finite_losses(base_run, tmp_path, capsys):
    train, val = _write_task(tmp_path)
    cfg = load_finetune_config(None, [
        f"base={base_run}", f"data.train={train}", f"data.val={val}", "data.max_length=64",
        "data.eval_generations=0", f"out_dir={tmp_path / 'run'}", "train.max_steps=6", "train.batch_size=2",
        "train.log_interval=1", "train.eval_interval=6", "train.device=cpu", "train.precision=fp32",
        "data.packing=true"])
    result = finetune(cfg, progress=True)
    assert f"{LONG} train examples with no answer token left dropped" in capsys.readouterr().out
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert result.step == 6 and len(losses) == 6 and all(math.isfinite(x) for x in losses)
