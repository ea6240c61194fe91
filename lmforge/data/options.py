"""The options of ``lmforge prepare`` (kept apart from :mod:`lmforge.data.prepare`, whose imports would slow
down every ``lmforge --help``)."""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.config import DataConfig
from lmforge.options import option

PREPARE_FIELDS = ("tokenizer", "vocab_size", "val_fraction", "seed", "text_field", "workers")
"""The DataConfig keys ``lmforge prepare`` takes as flags (--vocab-size, ...); sources are positional."""


@dataclass
class PrepareOptions:
    """Turn text files into tokenized train/val shards.

    Read text/markdown/code/JSONL/Parquet files, folders or globs; drop duplicates; split train/val; train a
    tokenizer; write train.bin/val.bin.
    """

    out: str
    """Output folder."""
    sources: list[str] = option([], positional=True)
    """Files, folders or globs (none: the Python standard library)."""
    overwrite: bool = False
    """Replace an existing prepared dataset in --out."""
    data: DataConfig = option(DataConfig(), only=PREPARE_FIELDS)
