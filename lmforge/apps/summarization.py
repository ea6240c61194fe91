"""Summarization of two kinds of local text, one model for both, each part judged against its own baselines:

- code: a Python function or class, its docstring removed -> the docstring's first sentence, from the
  standard library (the default corpus's files: its test suites left out) or any source tree given;
- man pages: a page's DESCRIPTION -> its NAME line's description (:mod:`lmforge.apps.manpages`), from
  the system's manual or any pages given.

Code: the input is the definition's source with the docstring's lines taken out, cut to :data:`MAX_INPUT`
characters at a line end (the head of a long class: its signature and first methods). Left out:
definitions without a docstring, whose first sentence is under 3 or over 30 words (or over
:data:`MAX_TARGET` characters), and those whose docstring was all they held. A record's key is its
file (see :class:`~lmforge.apps.pysource.Documented`).
"""

from __future__ import annotations

import ast
import re

from lmforge.apps import manpages
from lmforge.apps.baselines import name_words
from lmforge.apps.pysource import documented_definitions, first_sentence
from lmforge.apps.spec import App
from lmforge.apps.task_records import BuildReport, TaskRecord, both_sides

MAX_INPUT = 300
"""Characters of source the model reads: with the prompt around it, within the default model's 256 tokens."""
MAX_TARGET = 160


def without_docstring(lines: list[str], node: ast.AST) -> str:
    """The definition's source lines with its docstring's lines taken out, dedented, cut to MAX_INPUT."""
    doc = node.body[0]
    start = node.decorator_list[0].lineno if node.decorator_list else node.lineno
    kept = lines[start - 1:doc.lineno - 1] + lines[doc.end_lineno:node.end_lineno]
    indent = min((len(x) - len(x.lstrip()) for x in kept if x.strip()), default=0)
    text, out = "", []
    for line in kept:
        line = line[indent:].rstrip()
        if len(text) + len(line) + 1 > MAX_INPUT:
            break
        out.append(line)
        text += line + "\n"
    return "\n".join(out).strip("\n")


def build_summarization(sources: list[str], report: BuildReport) -> list[TaskRecord]:
    """One record per documented function, method or class in the .py files, and per man page (see the module
    docstring); no sources: the standard library's and the system manual's."""
    return build_code(sources, report) + manpages.build_manpages(sources, report)


def build_code(sources: list[str], report: BuildReport) -> list[TaskRecord]:
    """One record per documented function, method or class in the .py files."""
    records = []
    for d in documented_definitions(sources, report):
        target = first_sentence(d.docstring)
        if not 3 <= len(target.split()) <= 30 or len(target) > MAX_TARGET:
            report.dropped["first sentences under 3 or over 30 words"] += 1
        elif len(d.node.body) == 1:
            report.dropped["definitions that are only a docstring"] += 1
        elif not (source := without_docstring(d.lines, d.node)):
            report.dropped[f"definitions whose first line is over {MAX_INPUT} characters"] += 1
        else:
            records.append(TaskRecord(key=d.file, source=source, target=target, origin=f"{d.file}:{d.node.lineno}"))
    return records


def is_man(origin: str) -> bool:
    """Whether a record (by its origin) is a man page's."""
    return origin.startswith(manpages.ORIGIN)


def part(row: dict) -> str:
    """Which of the two tasks a written row is."""
    return "man pages" if is_man(row["origin"]) else "code"


def definition_name(record: TaskRecord) -> str:
    """The name a definition's first line gives it (def NAME / class NAME)."""
    match = re.search(r"^\s*(?:async\s+)?(?:def|class)\s+(\w+)", record.source, re.M)
    return match.group(1) if match else ""


def first_words(text: str, n: int = 8) -> str:
    return " ".join(text.split()[:n])


def lead(record: TaskRecord) -> str:
    """Baseline: code, the definition's name split into words (``read_file`` -> ``read file``); a man page, its
    DESCRIPTION's first sentence."""
    return first_sentence(record.source) if is_man(record.origin) else name_words(definition_name(record))


def lead_line(record: TaskRecord) -> str:
    """Baseline: code, the definition's first line (its signature); a man page, its DESCRIPTION's first 8 words."""
    if is_man(record.origin):
        return first_words(record.source)
    return next((x.strip() for x in record.source.splitlines() if re.match(r"\s*(async\s+)?(def|class)\s", x)), "")


def summarization_prompt(record: TaskRecord, neighbour: TaskRecord) -> str:
    """The encoder's input: the code (or the page's DESCRIPTION), then its name (in words for code: prose tokens
    the summary can reuse, where the identifier's are code tokens). The neighbour's summary is left out: given
    after a man page's name it moved that part's ROUGE-L from 19.7 to 20.0 (one seed: noise), far from its
    nearest neighbour's 28.9 (BENCHMARKS.md)."""
    if is_man(record.origin):
        return (f"Summarize the manual page in one line, as its NAME line would.\n\n{record.source}\n\n"
                f"Name: {manpages.page_name(record)}")
    return (f"Summarize the code in one sentence, as its docstring would.\n\n{record.source}\n\n"
            f"Name: {name_words(definition_name(record))}")


APP = App(name="summarization", summary="Python definitions to their docstring's first sentence, and man pages to "
          "their NAME line", build=build_summarization, prompt=summarization_prompt, metric="rougeL",
          metrics=("rouge1", "rouge2", "rougeL"), test_fraction=0.12, max_new_tokens=48,
          baselines={"lead (code: the name in words; man: the first sentence)": lead,
                     "lead (code: the first line; man: the first 8 words)": lead_line},
          pretrain_text=both_sides, part=part, beams=4, greedy_main=True)
