"""Only what pyproject.toml cannot say: install lmforge-lm-eval.pth at the root of site-packages.

lm-evaluation-harness finds `--model lmforge` one way per install type. A regular install (`pip
install 'lmforge[harness]'`) puts `lmforge-lm-eval.pth` into site-packages: Python runs it at
start-up, and its hook (`lmforge/_lm_eval_hook.py`) registers the model when lm-eval loads its
registry, so `lm_eval --model lmforge` works. An editable install (`pip install -e`) gets no `.pth`: there,
`lmforge lm-eval ARGS` registers the model the same way and runs lm-eval's command line with ARGS.
(lm-eval 0.4.13 discovers no plugins, so lmforge declares no entry point.)
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "lmforge-lm-eval.pth"


class BuildPyWithLmEvalHook(build_py):
    def run(self) -> None:
        super().run()
        self.copy_file(str(Path("lmforge") / PTH), str(Path(self.build_lib) / PTH))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / PTH)]


setup(cmdclass={"build_py": BuildPyWithLmEvalHook})
