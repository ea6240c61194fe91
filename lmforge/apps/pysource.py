"""Documented Python definitions of a source tree (the standard library by default): what the
summarization and question-answering builders read."""

from __future__ import annotations

import ast
import re
import sysconfig
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lmforge.apps.task_records import BuildReport
from lmforge.data.corpus import default_corpus_sources
from lmforge.errors import UserError

Definition = ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef


@dataclass
class Documented:
    """A function, method or class with a docstring."""

    file: str
    """Its file, relative to the tree it was found in: the key both builders split by, so every definition
    of a file lands on the same side (a method is never judged against its own class)."""
    lines: list[str]
    """The file's lines."""
    node: Definition
    docstring: str
    """Cleaned (``inspect.cleandoc``) by ``ast.get_docstring``."""


def source_files(sources: list[str]) -> list[tuple[Path, str]]:
    """The .py files to read, each with its name: relative to the folder given (or the standard library),
    so the names, and the split they decide, are the same wherever the tree lies. Sorted by name.
    No sources: the default corpus's files (the standard library, its test suites left out)."""
    if not sources:
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        return sorted(((Path(p), Path(p).relative_to(stdlib).as_posix()) for p in default_corpus_sources()),
                      key=lambda x: x[1])
    files: dict[str, Path] = {}
    for s in sources:
        p = Path(s)
        if p.is_dir():
            files.update((q.relative_to(p).as_posix(), q) for q in p.rglob("*.py") if q.is_file())
        elif p.is_file():
            files[p.name] = p
        else:
            raise UserError(f"source '{s}' does not exist (expected a .py file or a folder of them)")
    return [(path, name) for name, path in sorted(files.items())]


def documented_definitions(sources: list[str], report: BuildReport) -> Iterator[Documented]:
    """Every documented definition of the files, file by file in sorted order, each file's in source order.
    A file that cannot be read or parsed is skipped and counted; an undocumented definition is counted."""
    for path, name in source_files(sources):
        try:
            text = path.read_text(encoding="utf-8")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", SyntaxWarning)  # invalid escape sequences in old modules
                tree = ast.parse(text, filename=str(path))
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError) as e:
            report.skip_file(path, f"{type(e).__name__}: {e}")
            continue
        report.files += 1
        lines = text.splitlines()
        nodes = sorted((n for n in ast.walk(tree) if isinstance(n, Definition)), key=lambda n: (n.lineno, n.col_offset))
        for node in nodes:
            doc = ast.get_docstring(node)
            if doc is None:
                report.dropped["definitions without a docstring"] += 1
            else:
                yield Documented(name, lines, node, doc)


def first_sentence(docstring: str) -> str:
    """The docstring's (or any text's) first paragraph, on one line, up to the end of its first sentence."""
    paragraph = " ".join(docstring.strip().split("\n\n")[0].split())
    match = re.search(r"(?<=[.!?])\s", paragraph)
    return paragraph[:match.start()] if match else paragraph
