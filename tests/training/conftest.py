"""A small prepared dataset (character level, real text: a stdlib module's source), made once for the
training tests that run `lmforge train` on it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.config import DataConfig
from lmforge.data.prepare import prepare


@pytest.fixture(scope="package")
def dataset(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src") / "corpus.txt"
    src.write_text(Path(json.__file__).read_text() * 3)
    out = tmp_path_factory.mktemp("data") / "ds"
    prepare(DataConfig(sources=[str(src)], tokenizer="char", val_fraction=0.1), out, progress=False)
    return out
