"""The package's import graph has no cycle and follows its floors; the checker finds what it must."""

from pathlib import Path

import lmforge
from lmforge.devtools import imports


def test_the_package_import_graph_has_no_cycle_and_follows_the_floors(capsys):
    assert imports.main() == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "floor 0: ground" in out and "lmforge.training.pretrain ->" in out


def _package(root: Path, files: dict[str, str]) -> Path:
    pkg = root / "lmforge"
    for name, text in files.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
    return pkg


def test_cycles_upward_imports_and_hidden_local_imports_are_reported(tmp_path):
    pkg = _package(tmp_path, {
        "__init__.py": "",
        "config.py": "from lmforge import rundir\n",  # ground <-> ground: a cycle
        "rundir.py": "import lmforge.config\n",
        "runtime.py": "from lmforge.training import pretrain\n",  # ground -> floor 2: upward
        "training/__init__.py": "",
        "training/pretrain.py": "def f():\n    from lmforge.evaluate import lm\n",  # hidden in a function, and upward
        "evaluate/__init__.py": "",
        "evaluate/lm.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from lmforge.finetuning import x\n",
        "model/gpt.py": "from lmforge.data import loader\n",  # model and data never import each other
        "data/loader.py": "",
    })
    found = "\n".join(imports.problems(imports.build_graph(pkg)))
    assert "import cycle among: lmforge.config, lmforge.rundir" in found
    assert "lmforge.runtime (floor 0) imports lmforge.training.pretrain from a higher floor" in found
    assert "lmforge.training.pretrain:2 imports lmforge.evaluate.lm inside a function" in found
    assert "lmforge.model.gpt imports lmforge.data.loader" in found
    assert "finetune" not in found  # a TYPE_CHECKING import is no edge
    assert imports.build_graph(Path(lmforge.__file__).parent).edges  # the real package parses
