"""The embedded default corpus: the Python standard library of the running interpreter.

Every Python installation ships it, so ``lmforge train`` works out of the box with no download, and
the result is real, varied, human-written text (code, docstrings, comments) of about 12 MB.
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
from pathlib import Path

EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})
"""Third-party packages, bytecode, and the test suites: the tests are about 60% of the standard
library's bytes and mostly repetitive boilerplate (and some are deliberately malformed files), which
would crowd out the library code a model should learn from."""


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def default_corpus_sources() -> list[str]:
    """The sorted paths of the standard library's ``.py`` files, without tests and site-packages."""
    files = []
    for root, dirs, names in os.walk(_stdlib()):
        dirs[:] = [d for d in dirs if d not in EXCLUDED_DIRS and not d.startswith(".")]
        files += [os.path.join(root, n) for n in names if n.endswith(".py") and not n.startswith(".")]
    return sorted(files)


def default_corpus_id() -> str:
    """A short id of the default corpus for cache keys: Python version + hash of paths and sizes.

    The hash is of the paths relative to the standard library folder, so the same Python version
    installed in a different place gives the same id.
    """
    root = _stdlib()
    h = hashlib.sha256()
    for path in default_corpus_sources():
        h.update(f"{os.path.relpath(path, root)}\t{os.path.getsize(path)}\n".encode())
    version = ".".join(map(str, sys.version_info[:3]))
    return f"py{version}-{h.hexdigest()[:12]}"
