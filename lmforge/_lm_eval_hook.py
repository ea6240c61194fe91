"""Register the ``lmforge`` model with lm-evaluation-harness whenever ``lm_eval`` is imported.

lm-eval 0.4.13 (the newest on PyPI) discovers no plugins, so ``lm_eval --model lmforge`` could not
find us. lmforge installs ``lmforge-lm-eval.pth`` next to its package; Python runs that one line
at start-up, which imports this small module. It imports nothing heavy: it only waits, with a
meta-path finder, for ``lm_eval.api.registry`` to be loaded, then adds a lazy entry
("lmforge.evaluate.harness:LMForgeLM") to lm-eval's model registry. Without lm-eval it never fires.
"""

from __future__ import annotations

import contextlib
import sys
from importlib.machinery import ModuleSpec, PathFinder

TARGET = "lm_eval.api.registry"


class _RegisterWithLmEval:
    """A meta-path finder (any object with find_spec will do; importlib.abc costs start-up time)."""

    def find_spec(self, fullname: str, path=None, target=None) -> ModuleSpec | None:
        if fullname != TARGET:
            return None
        sys.meta_path.remove(self)  # once
        spec = PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module) -> None:
            load(module)
            registry = getattr(module, "model_registry", None)
            if registry is not None:
                with contextlib.suppress(Exception):  # never break lm-eval over an optional plugin
                    registry.register("lmforge", target="lmforge.evaluate.harness:LMForgeLM")

        spec.loader.exec_module = exec_module
        return spec


if not any(isinstance(f, _RegisterWithLmEval) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWithLmEval())
