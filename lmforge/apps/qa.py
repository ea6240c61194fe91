"""Question answering over the library's reference text: a function's entry as ``help()`` shows it (its
signature and docstring) is the context, and the question's answer is a span of it.

Two kinds of question, both answered from the context alone:

- "What is the default value of P in F?": the literal in the signature (``None``, ``'strict'``, ``0``);
  the signature holds the other parameters and their defaults too;
- "What does F return?": the rest of the docstring's first sentence after "Return(s)", when that is
  at most :data:`MAX_ANSWER_WORDS` words.

Built from the standard library (or any source tree given); scored SQuAD style (normalised exact
match and token F1). Records are keyed by file, like summarization's.
"""

from __future__ import annotations

import ast
import re

from lmforge.apps.pysource import Documented, documented_definitions
from lmforge.apps.spec import App
from lmforge.apps.task_records import BuildReport, TaskRecord

MAX_CONTEXT = 420
"""Characters of context (signature + docstring), cut at a line end: about 150 of the default model's tokens."""
MAX_ANSWER_WORDS = 12
MAX_LITERAL = 24
"""Longest default value asked about, in characters."""

_QUESTION = "\n\nQuestion: "


def help_text(d: Documented) -> str:
    """``NAME(SIGNATURE)`` and the docstring's lines, indented as help() shows them, cut to MAX_CONTEXT."""
    head = f"{d.node.name}({ast.unparse(d.node.args)})"
    out = head
    for line in d.docstring.splitlines():
        line = f"    {line}".rstrip()
        if len(out) + len(line) + 1 > MAX_CONTEXT:
            break
        out += "\n" + line
    return out


def defaults(args: ast.arguments) -> list[tuple[str, str]]:
    """(parameter, its default's literal) for every parameter of a signature that has a default."""
    positional = args.posonlyargs + args.args
    pairs = list(zip(positional[len(positional) - len(args.defaults):], args.defaults, strict=True))
    pairs += [(a, v) for a, v in zip(args.kwonlyargs, args.kw_defaults, strict=True) if v is not None]
    return [(a.arg, ast.unparse(v)) for a, v in pairs]


def what_it_returns(docstring: str) -> str | None:
    """The rest of the docstring's first sentence when that starts "Return(s)"; else None."""
    first = " ".join(docstring.split("\n\n")[0].split())
    match = re.match(r"Returns? (.+?)\.(?:\s|$)", first)
    return match.group(1) if match else None


def questions(d: Documented) -> list[tuple[str, str]]:
    """(question, answer) pairs answered by the definition's help text."""
    out = [(f"What is the default value of {arg} in {d.node.name}?", literal)
           for arg, literal in defaults(d.node.args) if len(literal) <= MAX_LITERAL]
    returns = what_it_returns(d.docstring)
    if returns and len(returns.split()) <= MAX_ANSWER_WORDS:
        out.append((f"What does {d.node.name} return?", returns))
    return out


def build_qa(sources: list[str], report: BuildReport) -> list[TaskRecord]:
    """A record per question on each documented function (classes have no signature to ask about)."""
    records = []
    for d in documented_definitions(sources, report):
        if isinstance(d.node, ast.ClassDef):
            report.dropped["classes"] += 1
            continue
        pairs = questions(d)
        if not pairs:
            report.dropped["functions with nothing to ask"] += 1
            continue
        context = help_text(d)
        for question, answer in pairs:
            if answer not in context:  # a long docstring cut before its first sentence ended
                report.dropped["answers cut from the context"] += 1
                continue
            records.append(TaskRecord(key=d.file, source=context + _QUESTION + question, target=answer,
                                      origin=f"{d.file}:{d.node.lineno}"))
    return records


def rule_answer(record: TaskRecord) -> str:
    """Baseline: what a rule reads without a model. The default value of P is the literal after ``P=`` in the
    signature (the help text's first line); what F returns is the rest of the docstring's first sentence after
    "Return(s)". Empty when the rule finds nothing."""
    context, question = record.source.rsplit(_QUESTION, 1)
    head, _, doc = context.partition("\n")
    if match := re.fullmatch(r"What is the default value of (\w+) in \w+\?", question):
        try:
            args = ast.parse(f"def {head}: pass").body[0].args
        except SyntaxError:
            return ""
        return dict(defaults(args)).get(match.group(1), "")
    return what_it_returns(doc) or ""


def qa_prompt(record: TaskRecord, neighbour: TaskRecord) -> str:
    """The user turn: the context and the question (the neighbour is left out: the context fills the room)."""
    context, question = record.source.rsplit(_QUESTION, 1)
    return f"Answer from the documentation, in a few words.\n\n{context}{_QUESTION}{question}"


APP = App(name="qa", summary="questions on the library reference (help() text), answered from it",
          build=build_qa, prompt=qa_prompt, metric="squad_f1", metrics=("squad_em", "squad_f1"),
          test_fraction=0.18, max_new_tokens=32, majority=True, distinct_targets=False,
          baselines={"rule (the signature's default, the Return(s) sentence)": rule_answer})
