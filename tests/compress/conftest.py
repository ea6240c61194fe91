"""A small trained run (byte-level BPE on real Python source) that the compression tests start from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.config import load_train_config
from lmforge.training.pretrain import train


@pytest.fixture(scope="package")
def run_dir(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src") / "corpus.txt"
    src.write_text(Path(json.__file__).read_text() * 3)
    out = tmp_path_factory.mktemp("runs") / "tiny"
    train(load_train_config(None, [f"data.sources=[{src}]", "data.tokenizer=bpe", "data.vocab_size=512",
                                   f"out_dir={out}", "model.preset=gpt2-tiny", "model.n_layer=2",
                                   "model.n_embd=64", "model.block_size=64", "train.batch_size=8",
                                   "train.max_steps=80", "train.eval_interval=80", "train.eval_batches=1",
                                   "train.log_interval=80", "optim.lr=3e-3", "train.device=cpu",
                                   "train.precision=fp32", "sample.num_samples=0"]),
          progress=False)
    return out
