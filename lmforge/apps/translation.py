"""Translation pairs from gettext catalogs: the messages of the programs on this machine, as their
translators wrote them (``/usr/share/locale/<lang>/LC_MESSAGES/*.mo``, or any ``.po``/``.mo`` given).

Kept: an entry with a translation, not fuzzy, not obsolete, not a plural form, whose format
placeholders (``%s``, ``%1$d``, ``%(name)s``, ``{0}``) are the same in both languages (a translation
may reorder them), with source and target of 1 to :data:`MAX_CHARS` characters. A message is
grouped (and split) by its source in a normal form (case, spacing and trailing punctuation
ignored), so "Cannot open %s" and "cannot open %s." never end up on both sides.
"""

from __future__ import annotations

import re
import struct
from collections import Counter
from pathlib import Path

import polib

from lmforge.apps.baselines import copy_source
from lmforge.apps.spec import App
from lmforge.apps.task_records import BuildReport, TaskRecord, both_sides
from lmforge.errors import UserError
from lmforge.evaluate import tasks

MAX_CHARS = 100
"""Longest source or target kept, in characters: four of them (a neighbour's pair and the message and
its translation) must fit the default model's 256-token context."""

LOCALE_DIR = Path("/usr/share/locale")

MO_MAX_EXPANSION = 4
"""A .mo's strings, their lengths summed over its tables, may add up to at most this many times the file's size
(plus :data:`MO_SLACK`). msgfmt stores every string once, so a real catalog's sum is below its size; only a
crafted (or corrupt) file points many entries at one long string, and parsing it would hold every copy in
memory (2,000 entries on one 1 MB string: 6 GB)."""
MO_SLACK = 1 << 16

_PLACEHOLDER = re.compile(r"%(?:\d+\$)?(?:\([A-Za-z_]\w*\))?[-+ #0']*(?:\*|\d+)?(?:\.(?:\*|\d+))?"
                          r"(?:hh|h|ll|l|L|q|j|z|t)?[diouxXeEfFgGaAcspn]|\{[A-Za-z_0-9]*(?:![rsa])?(?::[^{}]*)?\}")


def placeholders(text: str) -> Counter:
    """The format placeholders of a message, positions (``%2$``) left out: a translation may reorder them."""
    return Counter(re.sub(r"^%\d+\$", "%", m) for m in _PLACEHOLDER.findall(text.replace("%%", "")))


def message_key(text: str) -> str:
    """A message's normal form: case, runs of spaces and trailing punctuation ignored."""
    return " ".join(text.casefold().split()).rstrip(".:!?… ")


def catalog_paths(sources: list[str], lang: str) -> list[Path]:
    """The catalogs to read: each given .po/.mo file, every one under each given folder, or by default
    the system's catalogs for ``lang``."""
    if not sources:
        folder = LOCALE_DIR / lang / "LC_MESSAGES"
        if not folder.is_dir():
            raise UserError(f"no gettext catalogs for language '{lang}' in {folder} (give .po/.mo files or folders)")
        sources = [str(folder)]
    paths: list[Path] = []
    for s in sources:
        p = Path(s)
        if p.is_dir():
            paths += sorted(q for q in p.rglob("*") if q.suffix in (".po", ".mo") and q.is_file())
        elif p.is_file():
            paths.append(p)
        else:
            raise UserError(f"catalog '{s}' does not exist (expected a .po or .mo file, or a folder of them)")
    return sorted(set(paths))


def mo_expansion_problem(path: Path) -> str | None:
    """Why the .mo at ``path`` would expand to more than :data:`MO_MAX_EXPANSION` times its size in memory (or
    its tables do not fit in it), read from its header and tables alone; None when it is within bounds, or not
    a .mo at all (polib then says what is wrong). A .po cannot expand: its strings are its text."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        header = f.read(20)  # magic, revision, entries, offset of the originals' table, of the translations'
        if len(header) < 20:
            return None
        magic = struct.unpack("<I", header[:4])[0]
        if magic not in (polib.MOFile.MAGIC, polib.MOFile.MAGIC_SWAPPED):
            return None
        order = "<" if magic == polib.MOFile.MAGIC else ">"
        _, n, *tables = struct.unpack(order + "4I", header[4:])
        total = 0
        for offset in tables:
            if offset + 8 * n > size:
                return f"its table of {n:,} entries at byte {offset:,} runs past the end of the file ({size:,} bytes)"
            f.seek(offset)
            table = f.read(8 * n)
            total += sum(length for length, _ in struct.iter_unpack(order + "II", table))
    limit = MO_MAX_EXPANSION * size + MO_SLACK
    if total > limit:
        return (f"its {n:,} entries' strings add up to {total:,} bytes, over {limit:,} ({MO_MAX_EXPANSION}x the "
                f"file's {size:,} bytes): entries share strings, as only a crafted or corrupt catalog's do")
    return None


def _read_catalog(path: Path) -> polib._BaseFile | str:
    """The catalog, or why it is skipped: a .mo that would expand past its bound is refused before polib reads it."""
    if path.suffix != ".mo":
        return polib.pofile(str(path))
    return mo_expansion_problem(path) or polib.mofile(str(path))


def build_translation(sources: list[str], lang: str, report: BuildReport) -> list[TaskRecord]:
    """English -> ``lang`` records from the catalogs (see the module docstring for what is kept)."""
    records = []
    for path in catalog_paths(sources, lang):
        try:
            catalog = _read_catalog(path)
        except Exception as e:  # noqa: BLE001 - polib raises OSError, ValueError, struct.error... on a corrupt file
            catalog = f"{type(e).__name__}: {e}"
        if isinstance(catalog, str):
            report.skip_file(path, catalog)
            continue
        report.files += 1
        for entry in catalog:
            reason = _drop_reason(entry)
            if reason:
                report.dropped[reason] += 1
                continue
            records.append(TaskRecord(key=message_key(entry.msgid), source=entry.msgid, target=entry.msgstr,
                                      origin=path.name))
    return records


def _drop_reason(entry: polib._BaseEntry) -> str | None:
    if not entry.msgid.strip():
        return "empty messages"
    if entry.msgid_plural:
        return "plural forms"
    if entry.obsolete or "fuzzy" in entry.flags:
        return "fuzzy or obsolete entries"
    if not entry.msgstr.strip():
        return "untranslated messages"
    if len(entry.msgid) > MAX_CHARS or len(entry.msgstr) > MAX_CHARS:
        return f"messages over {MAX_CHARS} characters"
    if placeholders(entry.msgid) != placeholders(entry.msgstr):
        return "translations whose placeholders differ"
    return None


def translation_prompt(record: TaskRecord, neighbour: TaskRecord) -> str:
    """The encoder's input for fuzzy-match repair: the message, then the translation memory's match (the nearest
    training message) and that match's translation, which the model learns to copy where it fits and edit where
    it does not. (Measured, BENCHMARKS.md: this compact form on an encoder-decoder, chrF 29.5, against 21.8 for
    the decoder's chat prompt "Translate, as in the example ..." from the default run.)"""
    return f"{record.source}\n<=> {neighbour.source}\n<=> {neighbour.target}"


BANDS = (("≥ 0.9", 0.9, 2.0), ("0.7-0.9", 0.7, 0.9), ("< 0.7", -1.0, 0.7))
"""Bands of the translation memory's similarity (cosine of the character n-gram TF-IDF vectors)."""


def placeholders_kept(sources: list[str], outputs: list[str]) -> float | None:
    """Share (%) of outputs whose format placeholders are the source's (in any order); None for no outputs."""
    if not sources:
        return None
    return 100.0 * sum(placeholders(s) == placeholders(o) for s, o in zip(sources, outputs, strict=True)) \
        / len(sources)


def breakdown(rows: list[dict], outputs: list[str]) -> dict:
    """chrF and BLEU by the memory's similarity band (where a model adds to the memory, and where it does not), and
    the share of outputs that kept the source's placeholders (overall and among the messages that have some)."""
    bands = {}
    for name, low, high in BANDS:
        picked = [(r["reference"], o) for r, o in zip(rows, outputs, strict=True) if low <= r["similarity"] < high]
        scores = tasks.generation_metrics([o for _, o in picked], [[ref] for ref, _ in picked]) if picked else {}
        bands[name] = {"examples": len(picked), "chrf": scores.get("chrf"), "bleu": scores.get("bleu")}
    sources = [r["source"] for r in rows]
    with_some = [(s, o) for s, o in zip(sources, outputs, strict=True) if placeholders(s)]
    return {"bands": bands, "placeholders_kept": placeholders_kept(sources, outputs),
            "placeholders_kept_where_any": placeholders_kept([s for s, _ in with_some], [o for _, o in with_some]),
            "with_placeholders": len(with_some)}


APP = App(name="translation", summary="English to German (or any language given) from gettext catalogs",
          build=lambda sources, report, lang="de": build_translation(sources, lang, report),
          prompt=translation_prompt, metric="chrf", metrics=("chrf", "bleu"), test_fraction=0.02,
          max_new_tokens=80, baselines={"copy the source": copy_source}, options=("lang",),
          pretrain_text=both_sides, dev_fraction=0.01, self_matches=0.25, memory=True, beams=4,
          breakdown=breakdown)
