"""A model that memorised a few facts (tests/evaluate/memorised.py), trained once for the package."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.evaluate.memorised import train_memorised


@pytest.fixture(scope="package")
def memorised(tmp_path_factory) -> tuple[Path, Path]:
    return train_memorised(tmp_path_factory.mktemp("mc"))
