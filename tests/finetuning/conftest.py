"""A small pretrained base model (character level, on real Python source) and example files."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.finetuning.tasks import train_base, write_module_snippets, write_repeat_task


@pytest.fixture(scope="package")
def base_run(tmp_path_factory) -> Path:
    return train_base(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="package")
def repeat_task(tmp_path_factory) -> tuple[Path, Path]:
    return write_repeat_task(tmp_path_factory.mktemp("sft"))


@pytest.fixture(scope="package")
def module_snippets(tmp_path_factory) -> Path:
    return write_module_snippets(tmp_path_factory.mktemp("cls"))


def write_seq2seq_base(folder: Path, block_size: int = 64) -> Path:
    """A base run directory that costs no training: a freshly initialized encoder-decoder (seq2seq-tiny: 2 blocks a
    side) over a character tokenizer of argparse.py and textwrap.py with the framing's [PAD] and [MASK], written as a
    pretraining run (``lmforge train`` of encoder-decoders is not needed to fine-tune one)."""
    import argparse
    import textwrap

    import torch

    from lmforge.config import ModelConfig, from_dict
    from lmforge.data.seq2seq import Seq2SeqTokens
    from lmforge.data.tokenizer import Tokenizer
    from lmforge.model import build_model
    from tests.fixtures import save_seq2seq_run

    tokenizer = Tokenizer.train_char([Path(m.__file__).read_text() for m in (argparse, textwrap)])
    Seq2SeqTokens.of(tokenizer)  # adds [PAD] and [MASK]: the embedding needs their rows
    model_cfg = from_dict(ModelConfig, {"preset": "seq2seq-tiny", "block_size": block_size,
                                        "vocab_size": tokenizer.vocab_size})
    torch.manual_seed(0)
    return save_seq2seq_run(folder, build_model(model_cfg), tokenizer)


@pytest.fixture(scope="package")
def seq2seq_base(tmp_path_factory) -> Path:
    return write_seq2seq_base(tmp_path_factory.mktemp("bases") / "seq2seq")
