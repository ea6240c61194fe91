"""The public API by the names the README uses, from any directory: functions, never a subpackage."""

from __future__ import annotations

import subprocess
import sys

import lmforge
from tests.fixtures import HANG_S


def test_every_exported_name_is_what_it_says_even_after_the_packages_are_imported(tmp_path):
    code = ("import types, lmforge\n"
            "from lmforge import train, finetune, load_train_config\n"
            "import lmforge.training.pretrain, lmforge.finetuning.finetune\n"
            "assert callable(train) and callable(finetune) and lmforge.train is train\n"
            "assert not any(isinstance(getattr(lmforge, n), types.ModuleType) for n in lmforge.__all__)\n"
            "assert load_train_config('default').out_dir\n")  # a shipped recipe, by name
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=HANG_S)
    assert result.returncode == 0, result.stderr
    assert "train" in lmforge.__all__ and "finetune" in lmforge.__all__
