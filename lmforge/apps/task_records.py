"""Task records, their build report, the deterministic train/test split and the JSONL they are written as.

A record is what one application example is: the ``source`` the model reads (an English message, a
function without its docstring, a passage and a question), the ``target`` it should produce, and a
``key`` naming the group it belongs to. The split is decided per key by a hash of (seed, key), so it
never depends on file order, on what else was read, or on the machine; then no string is left on
both sides: a training record whose source or target is some test record's source or target is
dropped. The JSONL is written in a fixed order with fixed formatting, so the same inputs give the
same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True, order=True)
class TaskRecord:
    """One example of an application, before it becomes a prompt."""

    key: str
    """The group it splits with: records with the same key are always on the same side."""
    source: str
    """What the model reads."""
    target: str
    """What it should answer (the reference)."""
    origin: str = ""
    """Where it came from (catalog, file:line), for the reader of the data."""


@dataclass
class BuildReport:
    """What a builder read and what it left out, by reason: printed, and written beside the data."""

    files: int = 0
    """Files read."""
    skipped_files: dict[str, str] = field(default_factory=dict)
    """Files that could not be read (malformed, unreadable), with the reason."""
    dropped: Counter = field(default_factory=Counter)
    """Entries read but not made into records, counted by reason."""

    def skip_file(self, path: str | Path, reason: str) -> None:
        self.skipped_files[str(path)] = reason.splitlines()[0][:200] if reason else "unreadable"

    def as_dict(self) -> dict:
        return {"files": self.files, "skipped_files": dict(sorted(self.skipped_files.items())),
                "dropped": dict(sorted(self.dropped.items()))}

    def lines(self) -> list[str]:
        out = [f"read {self.files:,} files, skipped {len(self.skipped_files):,} malformed"]
        out += [f"  skipped {path}: {why}" for path, why in sorted(self.skipped_files.items())[:5]]
        if len(self.skipped_files) > 5:
            out.append(f"  ... and {len(self.skipped_files) - 5} more (build.json lists them all)")
        if self.dropped:
            out.append("left out: " + ", ".join(f"{n:,} {why}" for why, n in sorted(self.dropped.items())))
        return out


def both_sides(records: list[TaskRecord]) -> list[str]:
    """Every record's source and target: what translation's and summarization's bases are pretrained on."""
    return [text for r in records for text in (r.source, r.target)]


def group_hash(key: str, seed: int) -> float:
    """A hash of (seed, key), uniform in [0, 1)."""
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


def in_test(key: str, test_fraction: float, seed: int) -> bool:
    """Whether the group ``key`` is held out: its :func:`group_hash` is below the fraction."""
    return group_hash(key, seed) < test_fraction


def split_records(records: list[TaskRecord], test_fraction: float, seed: int, report: BuildReport,
                  distinct_targets: bool = True) -> tuple[list[TaskRecord], list[TaskRecord]]:
    """(train, test): de-duplicated by source (the first in sorted order stays), split by key, and no source
    or target string of a test record left anywhere in train. Both sorted.

    distinct_targets=False lets a test target recur as a training target (it is still never a training
    source): for answers such as "None" that many questions share."""
    unique: dict[str, TaskRecord] = {}
    for r in sorted(records):
        if r.source in unique:
            report.dropped["duplicate sources"] += 1
        else:
            unique[r.source] = r
    train, test = [], []
    for r in unique.values():
        (test if in_test(r.key, test_fraction, seed) else train).append(r)
    held = {s for r in test for s in (r.source, r.target)}
    held_targets = held if distinct_targets else {r.source for r in test}
    kept = [r for r in train if r.source not in held and r.target not in held_targets]
    if len(kept) < len(train):
        report.dropped["train records sharing a string with test"] += len(train) - len(kept)
    return kept, test


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """One JSON object per line (keys sorted, UTF-8, '\\n' endings), written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_jsonl(path: Path) -> list[dict]:
    """The rows :func:`write_jsonl` wrote."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
