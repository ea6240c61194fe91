"""Documents → dedupe → train/val split → tokens → ``train.bin``/``val.bin`` + ``meta.json``.

Three streaming passes over the sources, so memory does not grow with the corpus (only a hash and a
one-byte flag per document are kept, never the texts):

1. read every document: drop exact duplicates and empty ones, assign each kept one to train or val
   by a seeded hash of its content (independent of document order and of the number of workers);
2. train the tokenizer (BPE or WordPiece on the train documents, char on all of them), re-reading the sources;
3. tokenize in worker processes, in chunks of ~1 MB with a bounded number in flight, appending the
   tokens of each document followed by the end-of-text id to the split's ``.bin`` file, in order,
   so the output is byte-identical whatever the number of workers.

The dataset is built in a temporary folder next to ``out_dir`` and renamed into place at the end,
so a dataset folder with a ``meta.json`` is always complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import sys
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lmforge.config import DataConfig
from lmforge.data.corpus import default_corpus_id, default_corpus_sources
from lmforge.data.options import PrepareOptions
from lmforge.data.sources import SourceStats, iter_documents
from lmforge.data.tokenizer import MIN_BPE_VOCAB, Tokenizer
from lmforge.errors import UserError
from lmforge.malloc import M_MMAP_THRESHOLD, mallopt
from lmforge.rundir import TOKENIZER, cache_root, process_exists, storage_errors
from lmforge.testhooks import fault_point

FORMAT = 1
DEFAULT_CORPUS_NAME = "<python stdlib>"
CHUNK_CHARS = 1 << 20
"""Characters of text per tokenization task: large enough to amortise inter-process overhead."""
ENCODE_BATCH_CHARS = 1 << 16
"""Characters a worker encodes in one call (at least one piece): bounds the Encoding objects alive."""
PIECE_CHARS = 1 << 18
"""Longest text tokenized (or fed to a trainer) at once: longer documents are cut into pieces
(:func:`_document_pieces`), so memory does not grow with the largest document."""
_WORD_START = re.compile(r" (?=\S)")
"""A space that starts a word: byte-level BPE's and WordPiece's pre-tokenizers begin a new pre-token there."""
SPLITS = ("train", "val")
_SKIP, _TRAIN, _VAL, _KEPT = 0, 1, 2, 3
"""Per-document flags of pass 1: dropped, train, val, or kept for the tail split (both)."""


# --------------------------------------------------------------------------------------------------
# Pass 1: dedupe, skip empties, split


def _val_draw(seed: int, digest: bytes) -> float:
    """A uniform number in [0, 1) from (seed, content hash): the same wherever the document appears."""
    h = hashlib.sha256(seed.to_bytes(8, "little", signed=True) + digest).digest()
    return int.from_bytes(h[:8], "little") / 2**64


@dataclasses.dataclass
class _Scan:
    """What pass 1 learned: one flag per document read, and the counts for meta.json."""

    flags: bytearray
    stats: SourceStats
    kept: int = 0
    duplicates: int = 0
    empty: int = 0
    kept_bytes: int = 0
    content_hash: str = ""
    split: str = "document"


def _utf8_sha256(text: str) -> tuple[bytes, int]:
    """SHA-256 of ``text``'s UTF-8 bytes and their count, encoded a piece at a time (no full copy)."""
    h, n = hashlib.sha256(), 0
    for i in range(0, len(text), PIECE_CHARS):
        data = text[i:i + PIECE_CHARS].encode("utf-8")
        h.update(data)
        n += len(data)
    return h.digest(), n


def _scan(sources: list[str], cfg: DataConfig) -> _Scan:
    stats = SourceStats()
    scan = _Scan(bytearray(), stats)
    # 8 bytes of sha256 per document: a collision among 10^9 documents has probability ~3%, and
    # costs one wrongly dropped document; the full digest would triple the memory per document.
    seen: set[int] = set()
    content = hashlib.sha256()
    n_val = 0
    for doc in iter_documents(sources, cfg.text_field, stats):
        if not doc.text or doc.text.isspace():
            scan.empty += 1
            scan.flags.append(_SKIP)
            continue
        digest, n_bytes = _utf8_sha256(doc.text)
        key = int.from_bytes(digest[:8], "little")
        if key in seen:
            scan.duplicates += 1
            scan.flags.append(_SKIP)
            continue
        seen.add(key)
        content.update(digest)
        scan.kept += 1
        scan.kept_bytes += n_bytes
        is_val = _val_draw(cfg.seed, digest) < cfg.val_fraction
        n_val += is_val
        scan.flags.append(_VAL if is_val else _TRAIN)
    if scan.kept > 0 and (n_val == 0 or n_val == scan.kept):
        # Too few documents for a per-document split (e.g. one big text file): hold out the tail
        # of every document instead, as nanoGPT does for tinyshakespeare.
        scan.split = "tail"
        scan.flags = bytearray(_KEPT if f != _SKIP else _SKIP for f in scan.flags)
    scan.content_hash = content.hexdigest()
    return scan


def _document_pieces(text: str, size: int | None = None, start: int = 0, end: int | None = None) -> Iterator[str]:
    """``text`` in pieces of about ``size`` characters (:data:`PIECE_CHARS`) whose tokens, concatenated,
    are the whole text's: each cut is just before a space that starts a word (a space followed by a
    character that is not whitespace), where byte-level BPE's pre-tokenizer starts a new pre-token
    anyway, WordPiece's (BERT's) splits at every whitespace, and a character tokenizer cuts anywhere
    alike. A stretch of 4 x size characters without such a space (no ordinary text has one) is cut
    where it ends: the one place pieces may tokenize differently from the whole. ``start``/``end``
    select a part of ``text`` without copying it.
    """
    size = size or PIECE_CHARS
    end = len(text) if end is None else end
    while end - start > size:
        hit = _WORD_START.search(text, start + size, min(end, start + 4 * size))
        cut = hit.start() if hit else min(end, start + 4 * size)
        if cut == end:
            break
        yield text[start:cut]
        start = cut
    yield text[start:end]


def _pieces(sources: list[str], cfg: DataConfig, scan: _Scan) -> Iterator[tuple[int, str, bool]]:
    """Re-read the sources: (split, text, ends a document) for each kept document, cut into pieces of
    at most about PIECE_CHARS (the tail split: its two parts, each ending a document).

    Only lmforge's own tokenizers (bpe, wordpiece, char) get pieces; a tokenizer.json from elsewhere may treat the
    start of a text specially (SentencePiece's leading "▁"), so it is given whole documents.
    """
    cut_pieces = cfg.tokenizer in ("bpe", "wordpiece", "char")
    n = 0
    for n, doc in enumerate(iter_documents(sources, cfg.text_field), 1):
        if n > len(scan.flags):
            break
        flag = scan.flags[n - 1]
        text = doc.text
        if flag == _KEPT:
            cut = int(len(text) * (1 - cfg.val_fraction))
            parts = [(_TRAIN, 0, cut), (_VAL, cut, len(text))]
        elif flag != _SKIP:
            parts = [(flag, 0, len(text))]
        else:
            continue
        for split, start, end in parts:
            if end > start:
                *head, last = _document_pieces(text, None, start, end) if cut_pieces else [text[start:end]]
                yield from ((split, piece, False) for piece in head)
                yield split, last, True
    if n != len(scan.flags):
        raise UserError(f"the sources changed while being prepared ({_describe(cfg.sources)}); run again")


# --------------------------------------------------------------------------------------------------
# Pass 3: tokenization, in worker processes

_worker_tokenizer: Tokenizer | None = None


def _fix_mmap_threshold(nbytes: int = 1 << 20) -> None:
    """Serve every allocation of ``nbytes`` or more with its own mmap, given back when freed (glibc).

    glibc raises its mmap threshold (up to 32 MB) each time such a block is freed, after which the
    many-MB temporaries of encoding a large document land in the heap and fragment it: a worker's
    peak RSS then creeps up with every large document it meets (+30 MB over 100 MB of the default
    corpus). A fixed threshold keeps the peak at what the largest document needs. No-op elsewhere.
    """
    mallopt(M_MMAP_THRESHOLD, nbytes)


def _init_worker(tokenizer_json: str) -> None:
    global _worker_tokenizer
    # One process per core already: threads inside each would only oversubscribe the CPU.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _fix_mmap_threshold()
    _worker_tokenizer = Tokenizer.from_str(tokenizer_json)


def _encode_chunk(chunk: list[tuple[int, str, bool]], tokenizer: Tokenizer | None = None,
                  dtype: str = "uint16") -> dict[int, tuple[np.ndarray, int, int]]:
    """split -> (tokens of its pieces, EOT after each document's last; UTF-8 bytes; document count)."""
    tok = tokenizer or _worker_tokenizer
    assert tok is not None, "worker used before _init_worker"
    # tokenizers' Encoding objects take ~200 bytes a token: a worker (one thread) encodes
    # ENCODE_BATCH_CHARS at a time and keeps only uint16/32 arrays, so its memory is set by the
    # largest document, not by the whole chunk nor where that document falls in it. In-process
    # (one worker), the whole chunk is one batch, which tokenizers' threads share out.
    batch_chars = CHUNK_CHARS if tokenizer is not None else ENCODE_BATCH_CHARS
    eot = np.array([tok.eot_id], dtype=dtype)
    parts: dict[int, list[np.ndarray]] = {_TRAIN: [], _VAL: []}
    n_bytes = {_TRAIN: 0, _VAL: 0}
    n_docs = {_TRAIN: 0, _VAL: 0}
    start = 0
    while start < len(chunk):
        end, size = start, 0
        while end < len(chunk) and (end == start or size < batch_chars):
            size += len(chunk[end][1])
            end += 1
        batch = chunk[start:end]
        for (split, text, ends), ids in zip(batch, tok.encode_batch([t for _, t, _ in batch]), strict=True):
            parts[split] += [np.array(ids, dtype=dtype), eot] if ends else [np.array(ids, dtype=dtype)]
            n_bytes[split] += len(text.encode("utf-8"))
            n_docs[split] += ends
        start = end
    return {split: (np.concatenate(parts[split]) if parts[split] else np.empty(0, dtype=dtype),
                    n_bytes[split], n_docs[split]) for split in (_TRAIN, _VAL)}


def _chunks(pieces: Iterator[tuple[int, str, bool]]) -> Iterator[list[tuple[int, str, bool]]]:
    chunk: list[tuple[int, str, bool]] = []
    size = 0
    for piece in pieces:
        chunk.append(piece)
        size += len(piece[1])
        if size >= CHUNK_CHARS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def _tokenize(chunks: Iterator[list[tuple[int, str, bool]]], tok: Tokenizer, dtype: str, workers: int,
              out_dir: Path, total_bytes: int, progress: bool) -> dict[str, dict[str, int]]:
    counts = {name: {"documents": 0, "bytes": 0, "tokens": 0} for name in SPLITS}
    with contextlib.ExitStack() as stack:
        pool = None
        if workers > 1:
            # Set before the pool forks: tokenizers then neither warns nor deadlocks in the children
            # when its thread pool was already used here (training a tokenizer).
            with _env("TOKENIZERS_PARALLELISM", "false"):
                pool = stack.enter_context(multiprocessing.get_context().Pool(workers, _init_worker,
                                                                              (tok.to_str(),)))
        files = {split: stack.enter_context(open(out_dir / f"{SPLITS[split - 1]}.bin", "wb"))
                 for split in (_TRAIN, _VAL)}
        bar = stack.enter_context(tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing",
                                       disable=not progress))

        def write(result: dict[int, tuple[np.ndarray, int, int]]) -> None:
            for split, (ids, n_bytes, n_docs) in result.items():
                ids.tofile(files[split])
                c = counts[SPLITS[split - 1]]
                c["documents"] += n_docs
                c["bytes"] += n_bytes
                c["tokens"] += len(ids)
                bar.update(n_bytes)

        if pool is None:
            for chunk in chunks:
                write(_encode_chunk(chunk, tok, dtype))
            return counts
        # Pool.imap would read `chunks` ahead without limit (the whole corpus in memory); at most
        # 2 tasks per worker are in flight here, and results are taken in order.
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_encode_chunk, (chunk, None, dtype)))
            if len(pending) >= 2 * workers:
                write(pending.popleft().get())
        while pending:
            write(pending.popleft().get())
    return counts


# --------------------------------------------------------------------------------------------------
# The dataset folder


def _describe(sources: list[str]) -> str:
    if not sources:
        return DEFAULT_CORPUS_NAME
    shown = ", ".join(sources[:3])
    return shown + (f" and {len(sources) - 3} more" if len(sources) > 3 else "")


def _is_dataset(path: Path) -> bool:
    return (path / "meta.json").is_file()


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if _is_dataset(out):
        if not overwrite:
            raise UserError(f"'{out}' already holds a prepared dataset (pass --overwrite to replace it)")
    elif not out.is_dir() or any(out.iterdir()):
        raise UserError(f"'{out}' exists and is not a prepared dataset; choose another output folder")


def _tokenizer(cfg: DataConfig, sources: list[str], scan: _Scan, progress: bool) -> tuple[Tokenizer, dict]:
    if cfg.tokenizer in ("bpe", "wordpiece"):
        bpe = cfg.tokenizer == "bpe"
        texts = (text for split, text, _ in _pieces(sources, cfg, scan) if split == _TRAIN)
        # Away from a terminal the trainer's progress bars degrade to bare blank lines: a line instead.
        show = progress and sys.stderr.isatty()
        if progress and not show:
            print(f"training a {'BPE' if bpe else 'WordPiece'} tokenizer (vocabulary {cfg.vocab_size:,}) on the "
                  f"train split ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        train = Tokenizer.train_bpe if bpe else Tokenizer.train_wordpiece
        tok = train(texts, cfg.vocab_size, show_progress=show)
        if progress:
            print(f"tokenizer trained in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        if progress and tok.vocab_size < cfg.vocab_size:
            # Not a failure, but a surprise unless said: the trainer stops when no pair of tokens is left to merge.
            offered = (f"only {tok.vocab_size - MIN_BPE_VOCAB:,} merges to offer" if bpe
                       else "no more merges to offer")
            print(f"note: the vocabulary has {tok.vocab_size:,} tokens, not the {cfg.vocab_size:,} asked for "
                  f"(data.vocab_size): the train split had {offered} (a larger corpus has more)",
                  file=sys.stderr, flush=True)
        return tok, {"kind": cfg.tokenizer}
    if cfg.tokenizer == "char":
        return Tokenizer.train_char(text for _, text, _ in _pieces(sources, cfg, scan)), {"kind": "char"}
    return Tokenizer.from_file(cfg.tokenizer), {"kind": "file", "source": str(cfg.tokenizer)}


def prepare(cfg: DataConfig, out_dir: str | Path, progress: bool = True, overwrite: bool = False) -> dict:
    """Turn ``cfg.sources`` (empty: the default corpus) into a dataset folder; return its meta.

    ``out_dir`` receives ``train.bin``, ``val.bin`` (token ids, ``meta["dtype"]``), ``tokenizer.json``
    and ``meta.json``. An existing dataset there is replaced only with ``overwrite``. The returned
    dict is meta.json's content plus ``"dir"``, the folder (not stored, so datasets can be moved).
    """
    cfg.validate()
    out = Path(out_dir)
    _check_out_dir(out, overwrite)
    sources = list(cfg.sources) or default_corpus_sources()

    scan = _scan(sources, cfg)
    stats = scan.stats
    if scan.kept == 0:
        raise UserError(f"no text documents found in {_describe(cfg.sources)}: {stats.skipped_binary} "
                        f"binary files skipped, {scan.empty} empty documents")

    final = out.resolve()  # a name to derive the temp folder's from, even for out_dir="."
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(final)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with storage_errors(final, "writing dataset", "nothing was changed; free some space and run "
                            "prepare again"):
            tok, tok_meta = _tokenizer(cfg, sources, scan, progress)
            tok.save(tmp / TOKENIZER)
            fault_point("mid_prepare")
            dtype = "uint16" if tok.vocab_size <= 2**16 else "uint32"
            workers = cfg.workers or os.cpu_count() or 1
            splits = _tokenize(_chunks(_pieces(sources, cfg, scan)), tok, dtype, workers, tmp,
                               scan.kept_bytes, progress)
            meta = {
                "format": FORMAT,
                "dtype": dtype,
                "vocab_size": tok.vocab_size,
                "eot_id": tok.eot_id,
                "tokenizer": {**tok_meta, "path": TOKENIZER, "sha256": _file_sha256(tmp / TOKENIZER)},
                "split": scan.split,
                "val_fraction": cfg.val_fraction,
                "seed": cfg.seed,
                "splits": splits,
                "documents": {"read": stats.documents, "kept": scan.kept, "duplicates": scan.duplicates,
                              "empty": scan.empty, "skipped_binary": stats.skipped_binary},
                "invalid_utf8": stats.invalid_utf8,
                "sources": list(cfg.sources) or [DEFAULT_CORPUS_NAME],
                "content_hash": scan.content_hash,
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
            _move_into_place(tmp, final, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {**meta, "dir": str(out)}


def _remove_stale_temporaries(final: Path) -> None:
    """Remove the ``OUT.tmp-PID`` / ``OUT.old-PID`` folders that a killed ``prepare`` of the same
    output left behind (its process no longer exists; a running one's are left alone)."""
    for path in final.parent.glob(f"{glob.escape(final.name)}.*-*"):
        kind, _, pid = path.name[len(final.name) + 1:].partition("-")
        if kind in ("tmp", "old") and pid.isdigit() and not process_exists(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    # Checked again: another process may have finished the same dataset while this one worked.
    _check_out_dir(out, overwrite)
    if not out.exists():
        tmp.rename(out)
        return
    old = out.with_name(f"{out.name}.old-{os.getpid()}")
    out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old)


def load_meta(dataset_dir: str | Path) -> dict:
    """The meta.json of a prepared dataset (plus ``"dir"``); UserError if it is not one."""
    d = Path(dataset_dir)
    if not d.is_dir():
        raise UserError(f"dataset folder '{d}' does not exist")
    path = d / "meta.json"
    if not path.is_file():
        raise UserError(f"'{d}' is not a prepared dataset (no meta.json; run `lmforge prepare`)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"'{path}' is not valid JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"'{path}' is not a prepared dataset of format {FORMAT}")
    try:
        shaped = meta["dtype"] in ("uint16", "uint32") and all(
            type(meta["splits"][split][count]) is int for split in ("train", "val") for count in ("tokens", "bytes"))
    except (KeyError, TypeError):
        shaped = False
    if not shaped:
        raise UserError(f"'{path}' is damaged: it needs 'dtype' (uint16 or uint32) and token and byte counts of "
                        f"the train and val splits (prepare the dataset again)")
    _check_tokenizer(d, meta)
    return {**meta, "dir": str(d)}


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_tokenizer(d: Path, meta: dict) -> None:
    """UserError unless ``d``'s tokenizer.json is the one its meta.json was written with: the same bytes
    (SHA-256, recorded since meta.json has it), the same vocabulary size and end-of-text id, and those
    possible (the end-of-text id inside the vocabulary, the vocabulary inside the token dtype). A dataset
    prepared before the hash was recorded gets every check but the hash."""
    where, tok_path = d / "meta.json", d / TOKENIZER
    vocab, eot = meta.get("vocab_size"), meta.get("eot_id")
    limit = 2 ** (16 if meta["dtype"] == "uint16" else 32)
    if type(vocab) is not int or not 0 < vocab <= limit:
        raise UserError(f"'{where}' is damaged: 'vocab_size' is {vocab!r}, expected an integer in [1, {limit}] "
                        f"for {meta['dtype']} tokens (prepare the dataset again)")
    if type(eot) is not int or not 0 <= eot < vocab:
        raise UserError(f"'{where}' is damaged: 'eot_id' is {eot!r}, expected an integer in [0, {vocab}) "
                        f"(its vocab_size) (prepare the dataset again)")
    if not tok_path.is_file():
        raise UserError(f"'{tok_path}' is missing: a prepared dataset needs the tokenizer it was prepared with "
                        f"(prepare the dataset again)")
    recorded = meta["tokenizer"].get("sha256") if isinstance(meta.get("tokenizer"), dict) else None
    actual = _file_sha256(tok_path) if recorded is not None else None
    if actual != recorded:
        raise UserError(f"'{tok_path}' is not the tokenizer this dataset was prepared with (SHA-256 {actual:.16}..., "
                        f"'{where}' expects {str(recorded):.16}...): put the original back or prepare the dataset "
                        f"again")
    tok = Tokenizer.from_file(tok_path)
    if (tok.vocab_size, tok.eot_id) != (vocab, eot):
        raise UserError(f"'{tok_path}' has {tok.vocab_size} ids and end-of-text id {tok.eot_id}, but '{where}' "
                        f"expects vocab_size {vocab} and eot_id {eot}: it is not the tokenizer this dataset was "
                        f"prepared with (put the original back or prepare the dataset again)")


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def format_summary(meta: dict) -> str:
    """A few human-readable lines about a prepared dataset (what ``lmforge prepare`` prints)."""
    docs = meta["documents"]
    lines = [f"documents: {docs['read']:,} read, {docs['kept']:,} kept, {docs['duplicates']:,} duplicates, "
             f"{docs['empty']:,} empty, {docs['skipped_binary']:,} binary files skipped",
             f"invalid UTF-8: {meta['invalid_utf8']:,} replacement characters"]
    for name in SPLITS:
        s = meta["splits"][name]
        per_token = s["bytes"] / s["tokens"] if s["tokens"] else 0.0
        lines.append(f"{name + ':':6} {s['documents']:,} documents, {_size(s['bytes'])}, "
                     f"{s['tokens']:,} tokens ({per_token:.2f} bytes/token)")
    tok = meta["tokenizer"]
    lines.append(f"tokenizer: {tok['kind']}, vocab {meta['vocab_size']:,} ({meta['dtype']}); "
                 f"{meta['split']} split, val_fraction {meta['val_fraction']}")
    if "dir" in meta:
        lines.append(f"written to: {meta['dir']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# The default corpus, prepared once and cached


def _cache_key(cfg: DataConfig) -> str:
    if cfg.tokenizer in ("bpe", "wordpiece"):
        tok = f"{cfg.tokenizer}{cfg.vocab_size}"
    elif cfg.tokenizer == "char":
        tok = "char"
    else:  # keyed by content: the same file under another name is the same dataset
        tok = "file-" + hashlib.sha256(Path(cfg.tokenizer).read_bytes()).hexdigest()[:12]
    return f"{default_corpus_id()}-{tok}-val{cfg.val_fraction}-seed{cfg.seed}"


def prepared_default_dataset(cfg: DataConfig, cache_dir: Path | None = None, progress: bool = True) -> Path:
    """The default corpus prepared with ``cfg``'s tokenizer and split settings, from the cache.

    Prepared on first use into ``<cache_dir>/datasets/<key>`` (``cache_dir`` defaults to
    :func:`cache_root`); the key names the corpus (Python version and file list) and the settings.
    """
    if cfg.sources:
        raise ValueError("prepared_default_dataset is for the default corpus; cfg.sources must be empty")
    cfg.validate()
    out = Path(cache_dir or cache_root()) / "datasets" / _cache_key(cfg)
    if not _is_dataset(out):
        try:
            prepare(cfg, out, progress=progress)
        except UserError:
            if not _is_dataset(out):  # not a concurrent preparation that finished first
                raise
    return out


def prepare_command(o: PrepareOptions) -> None:
    """``lmforge prepare``: prepare the sources into ``o.out`` with a progress bar, print the summary."""
    meta = prepare(dataclasses.replace(o.data, sources=o.sources), o.out, progress=True, overwrite=o.overwrite)
    print(format_summary(meta))
