"""Record files (fine-tuning examples, evaluation tasks, texts to label): JSONL and CSV records,
each with the line it came from.

A bad record (not JSON, not an object, a missing field) stops with an error naming the file and
line, or, with ``skip_bad_lines``, is skipped and counted so the summary can report it.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.errors import UserError


@dataclass
class ReadReport:
    """What reading skipped (with ``skip_bad_lines``)."""

    skipped: list[str] = field(default_factory=list)
    """``file:line: reason`` of every skipped record."""

    def summary(self) -> list[str]:
        """A line for a run's summary if anything was skipped, else none."""
        if not self.skipped:
            return []
        return [f"skipped {len(self.skipped)} bad records, e.g. {self.skipped[0]}"]


class BadRecord(ValueError):
    """A record that cannot be used; the message says why (the caller adds where)."""


def _jsonl(path: Path) -> Iterator[tuple[int, Any | BadRecord]]:
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                yield n, BadRecord(f"not valid JSON ({e.msg})")


def _csv(path: Path) -> Iterator[tuple[int, Any | BadRecord]]:
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        reader = csv.DictReader(f)
        for row in reader:
            # line_num is the line where the row ends (a quoted field may span lines).
            if None in row or any(v is None for v in row.values()):
                yield reader.line_num, BadRecord(f"expected {len(reader.fieldnames or [])} columns")
            else:
                yield reader.line_num, row


def read_records(path: str | Path, convert: Callable[[dict[str, Any]], Any], skip_bad_lines: bool,
                 report: ReadReport | None = None) -> list[tuple[Any, str]]:
    """(convert(record), 'file:line') for every record of a .jsonl or .csv file.

    ``convert`` raises :class:`BadRecord` for a record it cannot use (e.g. a missing field).
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"example file '{p}' does not exist")
    suffix = p.suffix.lower()
    if suffix not in (".jsonl", ".csv"):
        raise UserError(f"example file '{p}': expected a .jsonl or .csv file")
    report = report if report is not None else ReadReport()
    out = []
    for line, raw in (_jsonl(p) if suffix == ".jsonl" else _csv(p)):
        where = f"{p}:{line}"
        try:
            if isinstance(raw, BadRecord):
                raise raw
            if not isinstance(raw, dict):
                raise BadRecord(f"expected a JSON object, got {type(raw).__name__}")
            out.append((convert(raw), where))
        except BadRecord as e:
            if not skip_bad_lines:
                raise UserError(f"{where}: {e} (--skip-bad-lines skips such lines)") from None
            report.skipped.append(f"{where}: {e}")
    if not out:
        raise UserError(f"example file '{p}' has no usable records")
    return out


def require(record: dict[str, Any], name: str, kind: type | tuple[type, ...] = str) -> Any:
    """record[name], which must exist and be of ``kind``, else BadRecord."""
    if name not in record:
        raise BadRecord(f"missing field '{name}' (fields: {', '.join(sorted(record)) or 'none'})")
    value = record[name]
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise BadRecord(f"field '{name}' should be a {names}, got {type(value).__name__}")
    return value


def read_text_file(path: str, flag: str) -> str:
    """The text of a UTF-8 text file given as ``flag``; UserError if it is missing, a folder or binary."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{flag} '{p}' {'is a folder' if p.is_dir() else 'does not exist'} (expected a text file)")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{flag} '{p}' is not UTF-8 text (byte {e.start} cannot be decoded)") from None
    if "\0" in text:
        raise UserError(f"{flag} '{p}' is a binary file (it holds NUL bytes); expected text")
    return text


def read_train_val(train: str, val: str | None, val_fraction: float, seed: int,
                   convert: Callable[[dict[str, Any]], Any], skip_bad_lines: bool,
                   report: ReadReport) -> tuple[list[tuple[Any, str]], list[tuple[Any, str]]]:
    """(train, val) records, converted: the ``val`` file, or a seeded hold-out of the ``train`` file."""
    train_records = read_records(train, convert, skip_bad_lines, report)
    if val:
        return train_records, read_records(val, convert, skip_bad_lines, report)
    return split_holdout(train_records, val_fraction, seed)


def split_holdout(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, val): a seeded random ``fraction`` of the items held out, at least one each."""

    if len(items) < 2:
        raise UserError(f"need at least 2 examples to hold some out for validation, got {len(items)}")
    n_val = min(len(items) - 1, max(1, round(len(items) * fraction)))
    order = np.random.default_rng(seed).permutation(len(items))
    val = set(order[:n_val].tolist())
    return [x for i, x in enumerate(items) if i not in val], [x for i, x in enumerate(items) if i in val]
