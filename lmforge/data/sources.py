"""Files, folders and globs → a stream of text documents.

``.jsonl`` files hold one document per line (a field of a JSON object), ``.parquet`` files one per
row (a string column); any other file is one document, its bytes decoded as UTF-8 with invalid bytes
replaced. Binary files are skipped. Everything is streamed: one file (or one Parquet batch) at a time.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import UserError

BINARY_SNIFF_BYTES = 8192
"""A NUL byte in this many leading bytes marks a file as binary (the heuristic git and grep use)."""
PARQUET_BATCH_ROWS = 1024
_ENCODED_REPLACEMENT = "\ufffd".encode()
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class Document:
    """One text document and where it came from."""

    text: str
    source: str
    """The file it was read from."""
    line: int | None = None
    """1-based line of a JSONL file or row of a Parquet file; None for a whole-file document."""


@dataclass
class SourceStats:
    """Counters filled in while documents are read."""

    files: int = 0
    """Files read (binary files skipped are not counted here)."""
    documents: int = 0
    skipped_binary: int = 0
    invalid_utf8: int = 0
    """Replacement characters produced for invalid UTF-8 (or lone surrogates in JSON strings)."""
    bytes: int = 0
    """Bytes read from disk."""


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name == "__pycache__"


def _walk(folder: Path) -> list[Path]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not _is_hidden(d)]  # pruning in place stops os.walk descending
        found += [Path(root) / f for f in files if not _is_hidden(f)]
    return sorted(found)


def expand_sources(sources: list[str]) -> list[Path]:
    """The files named by ``sources`` (files, folders walked recursively, glob patterns), in order.

    Each source's files are sorted, so the order is the same on every machine and every run; a file
    named twice is read once. A source that does not exist or a glob that matches nothing is a
    UserError naming it.
    """
    files: list[Path] = []
    for source in sources:
        path = Path(source).expanduser()
        if path.exists():
            matches = [path]
        elif any(c in source for c in "*?["):
            matches = [Path(m) for m in sorted(glob.glob(os.path.expanduser(source), recursive=True))]
            if not matches:
                raise UserError(f"data source '{source}' matches no files")
        else:
            raise UserError(f"data source '{source}' does not exist")
        for match in matches:
            files += _walk(match) if match.is_dir() else [match]
    return list(dict.fromkeys(files))


def _decode(data: bytes, stats: SourceStats) -> str:
    """UTF-8 with invalid bytes replaced by U+FFFD, counting only the replacements made."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        # The bytes EF BF BD always decode to a U+FFFD that was already in the file, so the
        # difference is exactly the number of replacements the decoder made.
        stats.invalid_utf8 += text.count("\ufffd") - data.count(_ENCODED_REPLACEMENT)
        return text


def _clean_json_string(text: str, stats: SourceStats) -> str:
    """Replace lone surrogates (JSON's "\\ud800" escapes) that no UTF-8 writer or tokenizer accepts."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        text, n = _SURROGATE.subn("\ufffd", text)
        stats.invalid_utf8 += n
        return text


def _read_jsonl(path: Path, text_field: str, stats: SourceStats) -> Iterator[Document]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            stats.bytes += len(raw)
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(_decode(raw, stats))
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise UserError(f"{where}: expected a JSON object with field '{text_field}'")
            if text_field not in record:
                raise UserError(f"{where}: no field '{text_field}' (set data.text_field)")
            text = record[text_field]
            if text is None:  # a null text is an empty document, counted as such downstream
                text = ""
            if not isinstance(text, str):
                kind = type(text).__name__
                raise UserError(f"{where}: field '{text_field}' is a {kind}, expected a string")
            yield Document(_clean_json_string(text, stats), str(path), lineno)


def _read_parquet(path: Path, text_field: str, stats: SourceStats) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"'{path}' is not a readable Parquet file: {e}") from None
    schema = pf.schema_arrow
    if text_field not in schema.names:
        names = ", ".join(schema.names)
        raise UserError(f"{path}: no column '{text_field}' (columns: {names}; set data.text_field)")
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise UserError(f"{path}: column '{text_field}' holds {kind}, expected strings")
    stats.bytes += path.stat().st_size
    row = 0
    # iter_batches decodes one row group at a time: memory is bounded by a row group, not the file.
    for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field]):
        for text in batch.column(0).to_pylist():
            row += 1
            yield Document(text or "", str(path), row)


def _read_text_file(path: Path, stats: SourceStats) -> Iterator[Document]:
    with open(path, "rb") as f:
        data = f.read()
    stats.bytes += len(data)
    yield Document(_decode(data, stats), str(path))


def looks_binary(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" in f.read(BINARY_SNIFF_BYTES)


def iter_documents(sources: list[str], text_field: str = "text",
                   stats: SourceStats | None = None) -> Iterator[Document]:
    """Stream the documents of ``sources`` (see :func:`expand_sources`) in a deterministic order.

    ``stats``, if given, is updated as documents are read. Binary files (a NUL byte in the first
    8 KiB) are skipped and counted; Parquet files are binary by nature and are never sniffed.
    """
    stats = stats if stats is not None else SourceStats()
    for path in expand_sources(sources):
        suffix = path.suffix.lower()
        try:
            if suffix != ".parquet" and looks_binary(path):
                stats.skipped_binary += 1
                continue
            stats.files += 1
            if suffix == ".jsonl":
                docs = _read_jsonl(path, text_field, stats)
            elif suffix == ".parquet":
                docs = _read_parquet(path, text_field, stats)
            else:
                docs = _read_text_file(path, stats)
            for doc in docs:
                stats.documents += 1
                yield doc
        except OSError as e:
            raise UserError(f"cannot read '{path}': {e.strerror or e}") from None
