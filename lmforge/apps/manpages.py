"""Prose summarization from the system's manual: a man page's DESCRIPTION section -> the description its NAME
line gives (``ls \\- list directory contents`` -> "list directory contents").

Read from the roff source (``man(7)`` and ``mdoc(7)`` pages, gzipped or not) by a small reader that keeps the
text and drops the formatting requests and escapes (groff renders ~16 pages a second here: the 20,000 pages of
this machine would take 20 minutes, where this reads them in 20 seconds).
Pages that only include another (``.so``) and links are left out (the page they name is read once), and so are
pages without a NAME description or a DESCRIPTION of at least :data:`MIN_WORDS` words. A record's key is the
page's family, its name up to the first ``-``, ``_`` or ``.`` (``git-commit`` -> ``git``), so that a family's pages,
which describe each other, land on the same side of the split.
"""

from __future__ import annotations

import gzip
import re
from pathlib import Path

from lmforge.apps.task_records import BuildReport, TaskRecord, group_hash

MAN_DIR = Path("/usr/share/man")
SECTIONS = tuple(f"man{n}" for n in range(1, 9))
"""Default pages: every section (commands, system calls, library functions, file formats, overviews...)."""
MAX_INPUT = 400
"""Characters of the DESCRIPTION the model reads, cut at a word end."""
MIN_WORDS = 12
MAX_TARGET_WORDS = 16
MAX_FAMILY = 400
"""Most pages kept of one family (picked by a hash of their names): a cloud SDK's 7,000 pages would else be most
of the task."""
ORIGIN = "man:"

_PAGE = re.compile(r"\.(\d\w*)(\.gz)?$")
_ESCAPES = [
    (re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""),  # font changes
    (re.compile(r"\\s[-+]?\d"), ""),  # size changes
    (re.compile(r"\\[*n](\[[^\]]*\]|\(..|.)"), ""),  # strings and number registers
    (re.compile(r"\\\((em|en)"), "-"),
    (re.compile(r"\\\((lq|rq|dq|oq|cq)|\\\[(lq|rq)\]"), '"'),
    (re.compile(r"\\\(bu"), "*"),
    (re.compile(r"\\\(..|\\\[[^\]]*\]"), ""),  # other special characters
    (re.compile(r"\\[-e]"), lambda m: "-" if m.group(0) == "\\-" else "\\"),
    (re.compile(r"\\[&|^%:)/,]"), ""),
    (re.compile(r"\\[ ~0]"), " "),
    (re.compile(r"\\c$"), ""),
]
_TEXT_MACROS = re.compile(r"^\.(B|I|BI|BR|IB|IR|RB|RI|SM|SB|Nm|Ar|Fl|Cm|Pa|Em|Sy|Li|Va|Ev|Dv|Xr|Ql|Dq|Sq|Op|Ic)\s+(.*)")
_MDOC_WORD = re.compile(r"Ns|Fl|Ar|Pa|Cm|Xr|Em|Sy|Li|Nm|Dq|Sq|Ql|Op|Oo|Oc|Pq|Ev|Va|Dv|Ic")


def unescape(text: str) -> str:
    """A roff line's text without its escapes."""
    for pattern, replacement in _ESCAPES:
        text = pattern.sub(replacement, text)
    return text


def text_lines(source: str) -> list[tuple[str, str]]:
    """(section, text) for each line of running text, the section being the last ``.SH``/``.Sh`` heading."""
    section, page, out = "", "", []
    for raw in source.splitlines():
        line = raw.rstrip()
        if line.startswith(('.\\"', "'\\\"")) or line in (".", "'"):
            continue
        if heading := re.match(r"^\.(SH|Sh)\s+(.*)", line):
            section = unescape(heading.group(2)).strip().strip('"').upper()
            continue
        if line.startswith((".", "'")):
            if re.match(r"^\.Nd\s", line):  # mdoc's NAME description
                out.append((section, "- " + unescape(line[4:])))
                continue
            if line == ".Nm" and page:  # mdoc: the page's name, as the NAME section's first .Nm gave it
                out.append((section, page))
                continue
            macro = _TEXT_MACROS.match(line)
            if macro is None:  # a request or a macro without text (.PP, .TP, .IX, .nf): a break
                continue
            words = [a or b for a, b in re.findall(r'"([^"]*)"|(\S+)', macro.group(2))]
            if macro.group(1) in ("BR", "IR", "RB", "RI", "BI", "IB"):  # alternating fonts: words run together
                line = "".join(words)
            else:
                if macro.group(1)[1:].islower():  # mdoc: macro names inside the line
                    words = [w for w in words if not _MDOC_WORD.fullmatch(w)]
                line = " ".join(words)
                if macro.group(1) == "Nm" and not page:
                    page = line
        out.append((section, unescape(line)))
    return out


def section_text(lines: list[tuple[str, str]], name: str) -> str:
    """The running text of the first section called ``name``, on one line."""
    return " ".join(" ".join(text for section, text in lines if section == name).split())


def read_page(path: Path) -> str:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    return raw.decode("utf-8", errors="replace")


def page_files(sources: list[str]) -> list[tuple[Path, str]]:
    """The pages to read with their names (``ls.1``), sorted by name: the files or folders given, or the system's
    sections :data:`SECTIONS`. Links are left out (their target is read under its own name)."""
    roots = [Path(s) for s in sources] or [MAN_DIR / s for s in SECTIONS]
    pages: dict[str, Path] = {}
    for root in roots:
        if root.is_file() and _PAGE.search(root.name):
            pages[root.name.removesuffix(".gz")] = root
        elif root.is_dir():
            pages.update((p.name.removesuffix(".gz"), p) for p in root.rglob("*")
                         if _PAGE.search(p.name) and p.is_file() and not p.is_symlink())
    return sorted(((path, name) for name, path in pages.items()), key=lambda x: x[1])


def name_description(lines: list[tuple[str, str]]) -> str:
    """The description of the NAME section's ``names \\- description``; empty without one."""
    name_line = section_text(lines, "NAME")
    match = re.search(r"\s+--?\s+", name_line)
    return name_line[match.end():] if match else ""


def build_manpages(sources: list[str], report: BuildReport) -> list[TaskRecord]:
    """One record per page with a NAME description and a DESCRIPTION (see the module docstring)."""
    records = []
    for path, name in page_files(sources):
        try:
            source = read_page(path)
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            report.skip_file(path, f"{type(e).__name__}: {e}")
            continue
        report.files += 1
        if re.match(r"^\.so\s", source.lstrip()):
            report.dropped["pages that include another (.so)"] += 1
            continue
        lines = text_lines(source)
        target = name_description(lines).rstrip(".").strip()
        description = section_text(lines, "DESCRIPTION")
        if not 2 <= len(target.split()) <= MAX_TARGET_WORDS:
            report.dropped[f"pages without a NAME description of 2 to {MAX_TARGET_WORDS} words"] += 1
        elif len(description.split()) < MIN_WORDS:
            report.dropped[f"pages with a DESCRIPTION under {MIN_WORDS} words"] += 1
        else:
            cut = description[:MAX_INPUT + 1]
            text = cut if len(cut) <= MAX_INPUT else cut[:cut.rfind(" ")]
            family = re.split(r"[-_.]", _PAGE.sub("", name), maxsplit=1)[0].lower() or name
            records.append(TaskRecord(key=ORIGIN + family, source=text, target=target, origin=ORIGIN + name))
    return capped(records, report)


def capped(records: list[TaskRecord], report: BuildReport) -> list[TaskRecord]:
    """At most :data:`MAX_FAMILY` records of each family: those whose names hash lowest."""
    families: dict[str, list[TaskRecord]] = {}
    for r in records:
        families.setdefault(r.key, []).append(r)
    kept = []
    for family in families.values():
        family.sort(key=lambda r: group_hash(r.origin, 0))
        kept += family[:MAX_FAMILY]
        if len(family) > MAX_FAMILY:
            report.dropped[f"pages past {MAX_FAMILY} of one family"] += len(family) - MAX_FAMILY
    return sorted(kept)


def page_name(record: TaskRecord) -> str:
    """The page's name (``ls`` for man:ls.1)."""
    return _PAGE.sub("", record.origin.removeprefix(ORIGIN))
