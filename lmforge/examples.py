"""Small example inputs for the README's tour (``lmforge examples DIR``), written from text every Python
installation has: the standard library's own docstrings and source.

What it writes, one file per input kind the tour uses:

- ``notes/*.md``: markdown notes (module docstrings), and ``corpus.jsonl``: a ``text`` field per record;
- ``chat.jsonl``: chat SFT pairs (``prompt`` -> ``response``: "Repeat: WORD" -> "WORD");
- ``qa.jsonl``: a generation task (``prompt``, ``reference``), words never in ``chat.jsonl``;
- ``mc.jsonl``: multiple choice (``context``, ``choices``, ``label``): which ending a docstring line has;
- ``modules.csv``: labelled texts (``text``, ``label``: the module a 4-line snippet of source is from),
  and ``new_texts.csv``: snippets to label;
- ``tasks/tour_mc.yaml``: ``mc.jsonl`` as an lm-evaluation-harness task;
- ``docstrings.txt``: plain text for character-level training (the tour's stand-in for tinyshakespeare, which a
  fresh clone does not have): every docstring of the standard library's top-level modules, about 0.9 MB.

The same interpreter always writes the same files (fixed seeds, modules in name order).
"""

from __future__ import annotations

import ast
import csv
import json
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import UserError
from lmforge.options import option

NOTE_MODULES = ("json/__init__", "textwrap", "string", "shutil", "difflib", "calendar")
CORPUS_MODULES = ("argparse", "tarfile", "zipfile", "pathlib", "functools", "inspect")
SNIPPET_MODULES = ("argparse", "calendar", "tarfile", "difflib")

HARNESS_TASK = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {mc}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
"""
"""A multiple-choice JSONL file (``{mc}``) as an lm-evaluation-harness task named ``{name}``."""


FILES = ("chat.jsonl", "corpus.jsonl", "docstrings.txt", "mc.jsonl", "modules.csv", "new_texts.csv", "qa.jsonl",
         *(f"notes/{m.split('/')[0]}.md" for m in NOTE_MODULES), "tasks/tour_mc.yaml")
"""What :func:`write_examples` writes, relative to its folder (the README test checks the tour reads only these)."""


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _source(module: str) -> str:
    return (_stdlib() / f"{module}.py").read_text(encoding="utf-8")


def _docstrings(module: str, source: str | None = None) -> list[str]:
    """The module's docstring, then each class's and function's, in source order."""
    tree = ast.parse(_source(module) if source is None else source)
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.ClassDef))]
    return [doc for node in nodes if (doc := ast.get_docstring(node))]


def _all_docstrings() -> str:
    """Every docstring of the standard library's top-level modules (name order), blank-line separated. Only the
    top level: some installations keep site-packages below the standard library's folder."""
    docs = []
    for path in sorted(_stdlib().glob("*.py")):
        try:
            docs += _docstrings(path.stem, path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
            continue  # a module this interpreter cannot read or parse (a distribution's leftover) adds nothing
    return "\n\n".join(docs) + "\n"


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def _words() -> list[str]:
    words = sorted({w for w in _source("argparse").split() if w.isalpha() and w.islower() and 3 <= len(w) <= 6})
    random.Random(0).shuffle(words)
    return words


def _choice_items(rng: random.Random) -> list[dict]:
    """Docstring first lines cut in half: the right second half against another line's."""
    lines = [doc.splitlines()[0] for m in NOTE_MODULES for doc in _docstrings(m)]
    lines = [line for line in dict.fromkeys(lines) if len(line.split()) >= 6][:60]
    items = []
    for i, line in enumerate(lines):
        words = line.split()
        cut = len(words) // 2
        other = lines[(i + 7) % len(lines)].split()
        choices = [" " + " ".join(words[cut:]), " " + " ".join(other[len(other) // 2:])]
        label = rng.randrange(2)
        if label:
            choices.reverse()
        items.append({"context": " ".join(words[:cut]), "choices": choices, "label": label})
    return items


def _snippets(rng: random.Random) -> list[dict]:
    rows = []
    for name in SNIPPET_MODULES:
        lines = [line for line in _source(name).splitlines() if line.strip()]
        rows += [{"text": "\n".join(lines[i:i + 4]), "label": name} for i in range(0, min(len(lines) - 4, 800), 4)]
    rng.shuffle(rows)
    return rows


def _write_csv(path: Path, rows: list[dict], fields: tuple[str, ...]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def write_examples(out: str | Path) -> list[Path]:
    """Write the tour's example inputs into ``out`` (created; refused if it holds files); returns them."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"'{out}' already exists and is not an empty folder (nothing was overwritten)")
    (out / "notes").mkdir(parents=True, exist_ok=True)
    (out / "tasks").mkdir(exist_ok=True)
    rng = random.Random(0)
    for module in NOTE_MODULES:
        name = module.split("/")[0]
        (out / "notes" / f"{name}.md").write_text(f"# {name}\n\n{_docstrings(module)[0]}\n", encoding="utf-8")
    _write_jsonl(out / "corpus.jsonl", [{"text": doc} for m in CORPUS_MODULES for doc in _docstrings(m)])
    words = _words()
    _write_jsonl(out / "chat.jsonl", [{"prompt": f"Repeat: {w}", "response": w} for w in words[:250]])
    _write_jsonl(out / "qa.jsonl", [{"prompt": f"Repeat: {w}\n", "reference": w} for w in words[250:280]])
    _write_jsonl(out / "mc.jsonl", _choice_items(rng))
    snippets = _snippets(rng)
    _write_csv(out / "modules.csv", snippets[:-20], ("text", "label"))
    _write_csv(out / "new_texts.csv", snippets[-20:], ("text",))
    (out / "tasks" / "tour_mc.yaml").write_text(HARNESS_TASK.format(name="tour_mc", mc=(out / "mc.jsonl").resolve()),
                                                encoding="utf-8")
    (out / "docstrings.txt").write_text(_all_docstrings(), encoding="utf-8")
    return sorted(p for p in out.rglob("*") if p.is_file())


@dataclass
class ExamplesOptions:
    """Write the README tour's small example inputs (from the standard library)."""

    out: str = option(positional=True)
    """Folder to create."""


def examples_command(o: ExamplesOptions) -> None:
    """``lmforge examples``: write the files, say which."""
    files = write_examples(o.out)
    names = ", ".join(str(f.relative_to(o.out)) for f in files)
    print(f"wrote {len(files)} example files into {o.out}: {names}")
