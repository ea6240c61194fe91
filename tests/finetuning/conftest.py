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
