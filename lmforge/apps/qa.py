"""Question answering over the library reference: which of a few functions does what a sentence says?

The context is :data:`CHOICES` numbered entries of one file's documented functions, as ``help()`` shows them
(the signature and the docstring) but with each docstring's first sentence taken out; the question is one of
those first sentences less the words of the function's name ("Which of them: Return the number of in text." for
``count_words``); the answer is that entry's number. So the answer is not found by matching the question against
the context: the sentence is not there, nor the name's words in it, and the model must read the signatures and
the rest of the docstrings to tell which entry the sentence describes. (The first version asked "What is the
default value of P in F?" and "What does F return?", whose answers a rule reads off the signature and the
docstring's first sentence with F1 100: BENCHMARKS.md.)

Built from the standard library (or any source tree given); scored SQuAD style (normalised exact match and
token F1, one and the same for a number). Records are keyed by file, like summarization's. The rule baseline is
the entry that shares the most words with the question (its name split into words, its signature and the rest
of its docstring): the sliding-window baseline of reading comprehension.
"""

from __future__ import annotations

import ast
import re

from lmforge.apps.baselines import name_words
from lmforge.apps.pysource import Documented, documented_definitions, first_sentence
from lmforge.apps.spec import App
from lmforge.apps.task_records import BuildReport, TaskRecord, group_hash

CHOICES = 3
MAX_ENTRY = 150
"""Characters of each entry (signature + the docstring's rest), cut at a word end: the three fill about 160 of
the base's tokens."""
MAX_QUESTION_WORDS = 30

_QUESTION = "\n\nWhich of them: "
_STOPWORDS = frozenset(("a", "an", "the", "of", "to", "in", "on", "for", "and", "or", "is", "are", "be", "by",
                        "with", "as", "at", "if", "it", "its", "this", "that", "from", "return", "returns", "true",
                        "false", "none"))


def entry(d: Documented) -> str:
    """``NAME(SIGNATURE)`` and the docstring without its first sentence, on one line, cut to MAX_ENTRY."""
    rest = " ".join(d.docstring.split())[len(first_sentence(d.docstring)):].strip()
    text = f"{d.node.name}({ast.unparse(d.node.args)}) {rest}".strip()
    if len(text) <= MAX_ENTRY:
        return text
    cut = text[:MAX_ENTRY]
    return cut[:cut.rfind(" ")] if " " in cut else cut


def functions_by_file(sources: list[str], report: BuildReport) -> dict[str, list[Documented]]:
    """Each file's documented functions and methods with a usable first sentence, one per name (the first)."""
    files: dict[str, dict[str, Documented]] = {}
    for d in documented_definitions(sources, report):
        if isinstance(d.node, ast.ClassDef):
            report.dropped["classes"] += 1
        elif not 3 <= len(first_sentence(d.docstring).split()) <= MAX_QUESTION_WORDS:
            report.dropped[f"first sentences under 3 or over {MAX_QUESTION_WORDS} words"] += 1
        elif d.node.name in files.setdefault(d.file, {}):
            report.dropped["functions whose name an earlier one in the file has"] += 1
        else:
            files[d.file][d.node.name] = d
    return {f: list(fs.values()) for f, fs in files.items()}


def build_qa(sources: list[str], report: BuildReport) -> list[TaskRecord]:
    """A question per function of a file with at least CHOICES of them: its first sentence, asked among itself and
    the CHOICES - 1 others of the file that a hash of their names puts next to it; the entries in an order that
    hash decides too (so the answer's place carries nothing)."""
    records = []
    for file, functions in sorted(functions_by_file(sources, report).items()):
        if len(functions) < CHOICES:
            report.dropped[f"functions in files with fewer than {CHOICES}"] += len(functions)
            continue
        ring = sorted(functions, key=lambda d: group_hash(f"{file}\0{d.node.name}", 0))
        for i, d in enumerate(ring):
            picked = [ring[(i + k) % len(ring)] for k in range(CHOICES)]
            picked.sort(key=lambda c: group_hash(f"{file}\0{d.node.name}\0{c.node.name}", 1))
            context = "\n".join(f"{n}. {entry(c)}" for n, c in enumerate(picked, 1))
            records.append(TaskRecord(key=file, source=context + _QUESTION + question(d),
                                      target=str(picked.index(d) + 1), origin=f"{file}:{d.node.lineno}"))
    return records


def question(d: Documented) -> str:
    """The docstring's first sentence less its words that are the name's (``read_config``: "Read the configuration
    file." -> "the configuration file."): the question does not give the name away."""
    named = set(name_words(d.node.name).split())
    return " ".join(w for w in first_sentence(d.docstring).split()
                    if not named & set(name_words(" ".join(re.findall(r"[^\W_]+", w))).split()))


def words(text: str) -> set[str]:
    """Lower-case words of text, identifiers split (``read_config`` -> read, config), common words left out."""
    return {w for w in name_words(" ".join(re.findall(r"\w+", text))).split() if w not in _STOPWORDS}


def rule_answer(record: TaskRecord) -> str:
    """Baseline: the number of the entry sharing the most words with the question (the first of equal ones)."""
    context, question = record.source.rsplit(_QUESTION, 1)
    asked = words(question)
    entries = [line.split(". ", 1) for line in context.splitlines() if line]
    return max(entries, key=lambda e: len(asked & words(e[1])))[0]


def qa_prompt(record: TaskRecord, neighbour: TaskRecord) -> str:
    """The encoder's input: the numbered entries and the question (the neighbour is left out: its answer is about
    another file's functions)."""
    return f"Which function does what the sentence says? Answer with its number.\n\n{record.source}"


def contexts_and_answers(records: list[TaskRecord]) -> list[str]:
    """What the qa base is pretrained on: every training record's entries, question and answer."""
    return [f"{r.source}\n{r.target}" for r in records]


APP = App(name="qa", summary="which of three library functions (help() text, first sentence taken out) does what "
          "a sentence says", build=build_qa, prompt=qa_prompt, metric="squad_f1", metrics=("squad_em", "squad_f1"),
          test_fraction=0.15, max_new_tokens=16, distinct_targets=False,
          majority=True, baselines={"rule (the entry sharing most words with the question)": rule_answer},
          pretrain_text=contexts_and_answers)
