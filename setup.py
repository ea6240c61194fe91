"""Only what pyproject.toml cannot say: install lmforge-lm-eval.pth at the root of site-packages
(see lmforge/_lm_eval_hook.py), for regular and editable installs alike."""

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
