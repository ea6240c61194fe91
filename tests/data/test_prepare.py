import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

import lmforge.data.prepare as prep
from lmforge.config import DataConfig
from lmforge.data.prepare import format_summary, load_meta, prepare, prepared_default_dataset
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError
from tests.fixtures import HANG_S


def _docs(n: int) -> list[str]:
    words = ["alpha", "beta", "gamma", "delta", "épsilon", "ζeta", "eta\t", "θ\n", "iota 😀", "kappa"]
    return [f"document {i}: " + " ".join(words[(i * k) % len(words)] for k in range(3 + i % 7)) + "\n"
            for i in range(n)]


def _jsonl(path, texts: list[str]):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def _split_texts(out, split: str) -> list[str]:
    """The documents of a split, recovered by decoding its .bin and cutting at EOT."""
    meta = load_meta(out)
    tok = Tokenizer.from_file(out / "tokenizer.json")
    ids = np.fromfile(out / f"{split}.bin", dtype=meta["dtype"]).tolist()
    docs, start = [], 0
    for i, t in enumerate(ids):
        if t == meta["eot_id"]:
            docs.append(tok.decode(ids[start:i]))
            start = i + 1
    assert start == len(ids), "every document ends with EOT"
    return docs


def _cfg(path, **kw) -> DataConfig:
    defaults = {"sources": [str(path)], "tokenizer": "char", "val_fraction": 0.2, "workers": 1}
    return DataConfig(**{**defaults, **kw})


def test_bins_hold_every_kept_document_and_meta_counts_match_file_sizes(tmp_path):
    texts = _docs(40)
    out = tmp_path / "ds"
    meta = prepare(_cfg(_jsonl(tmp_path / "d.jsonl", texts), tokenizer="bpe", vocab_size=300), out,
                   progress=False)
    assert meta == load_meta(out) and json.loads((out / "meta.json").read_text()) == {
        k: v for k, v in meta.items() if k != "dir"}
    sha256 = hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest()
    assert meta["dtype"] == "uint16"
    assert meta["tokenizer"] == {"kind": "bpe", "path": "tokenizer.json", "sha256": sha256}
    assert meta["split"] == "document" and meta["documents"]["kept"] == 40
    train, val = _split_texts(out, "train"), _split_texts(out, "val")
    assert sorted(train + val) == sorted(texts) and train and val
    for name, docs in (("train", train), ("val", val)):
        s = meta["splits"][name]
        assert s["tokens"] * 2 == os.path.getsize(out / f"{name}.bin")
        assert s["documents"] == len(docs) and s["bytes"] == sum(len(t.encode()) for t in docs)
    assert sorted(os.listdir(tmp_path)) == ["d.jsonl", "ds"]  # no temp dir left behind
    summary = format_summary(meta)
    assert "40 kept" in summary and str(out) in summary
    assert f"{meta['splits']['val']['tokens']:,} tokens" in summary


@pytest.mark.parametrize("vocab_size", [8192, 300])
def test_a_bpe_vocabulary_smaller_than_asked_says_why_in_one_line(vocab_size, tmp_path, capsys):
    src = _jsonl(tmp_path / "d.jsonl", _docs(20))
    meta = prepare(_cfg(src, tokenizer="bpe", vocab_size=vocab_size), tmp_path / "out", progress=True)
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    if vocab_size == 300:  # the tiny corpus has more than 43 merges to offer: the size asked, and no note
        assert meta["vocab_size"] == 300 and notes == []
    else:
        assert meta["vocab_size"] < 8192
        assert notes == [f"note: the vocabulary has {meta['vocab_size']:,} tokens, not the 8,192 asked for "
                         f"(data.vocab_size): the train split had only {meta['vocab_size'] - 257:,} merges to offer "
                         f"(a larger corpus has more)"]


def test_exact_duplicates_and_empty_documents_are_dropped_and_counted(tmp_path):
    texts = _docs(10)
    src = _jsonl(tmp_path / "d.jsonl", texts + [texts[3], texts[3], "", "  \n\t", texts[7]])
    meta = prepare(_cfg(src), tmp_path / "ds", progress=False)
    assert meta["documents"] == {"read": 15, "kept": 10, "duplicates": 3, "empty": 2, "skipped_binary": 0}
    kept = _split_texts(tmp_path / "ds", "train") + _split_texts(tmp_path / "ds", "val")
    assert sorted(kept) == sorted(texts)


def test_document_split_is_seeded_and_independent_of_order(tmp_path):
    texts = _docs(60)
    a = prepare(_cfg(_jsonl(tmp_path / "a.jsonl", texts)), tmp_path / "a", progress=False)
    b = prepare(_cfg(_jsonl(tmp_path / "b.jsonl", texts[::-1])), tmp_path / "b", progress=False)
    c = prepare(_cfg(tmp_path / "a.jsonl", seed=7), tmp_path / "c", progress=False)
    val_a, val_b, val_c = (set(_split_texts(tmp_path / d, "val")) for d in "abc")
    assert val_a == val_b and val_a != val_c
    assert 0 < len(val_a) < 30  # about 20% of 60
    assert a["content_hash"] != b["content_hash"] and a["content_hash"] == c["content_hash"]


def test_single_document_falls_back_to_tail_split(tmp_path):
    text = "".join(_docs(30))
    (tmp_path / "input.txt").write_text(text)
    meta = prepare(_cfg(tmp_path / "input.txt", val_fraction=0.1), tmp_path / "ds", progress=False)
    cut = int(len(text) * 0.9)
    assert meta["split"] == "tail"
    assert _split_texts(tmp_path / "ds", "train") == [text[:cut]]
    assert _split_texts(tmp_path / "ds", "val") == [text[cut:]]


def test_output_is_byte_identical_whatever_the_number_of_workers(tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "CHUNK_CHARS", 300)  # many chunks, so ordering across workers matters
    src = _jsonl(tmp_path / "d.jsonl", _docs(200))
    for workers in (1, 2):
        prepare(_cfg(src, tokenizer="bpe", vocab_size=300, workers=workers), tmp_path / f"w{workers}",
                progress=False)
    for name in ("train.bin", "val.bin", "tokenizer.json", "meta.json"):
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes(), name


def test_tokenizer_file_is_used_as_given(tmp_path):
    src = _jsonl(tmp_path / "d.jsonl", _docs(20))
    Tokenizer.train_char(_docs(20)).save(tmp_path / "tok.json")
    meta = prepare(_cfg(src, tokenizer=str(tmp_path / "tok.json")), tmp_path / "ds", progress=False)
    assert meta["tokenizer"]["kind"] == "file"
    written = json.loads((tmp_path / "ds" / "tokenizer.json").read_text())
    assert written == json.loads((tmp_path / "tok.json").read_text())
    with pytest.raises(UserError, match="missing.json"):
        prepare(_cfg(src, tokenizer=str(tmp_path / "missing.json")), tmp_path / "ds2", progress=False)


def test_corpus_without_text_is_a_user_error(tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "a.dat").write_bytes(b"\x00\x01" * 10)
    (tmp_path / "bin" / "empty.txt").write_text("   \n")
    with pytest.raises(UserError, match="no text documents found in .*bin: 1 binary files skipped, 1 empty"):
        prepare(_cfg(tmp_path / "bin"), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_existing_dataset_is_refused_unless_overwrite(tmp_path):
    src = _jsonl(tmp_path / "d.jsonl", _docs(10))
    prepare(_cfg(src), tmp_path / "ds", progress=False)
    with pytest.raises(UserError, match="already holds a prepared dataset"):
        prepare(_cfg(src), tmp_path / "ds", progress=False)
    _jsonl(src, _docs(12))
    assert prepare(_cfg(src), tmp_path / "ds", progress=False, overwrite=True)["documents"]["kept"] == 12
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a prepared dataset"):
        prepare(_cfg(src), tmp_path / "other", progress=False, overwrite=True)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_load_meta_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_meta(tmp_path / "nope")
    with pytest.raises(UserError, match="not a prepared dataset"):
        load_meta(tmp_path)


def _edit_meta(out: Path, drop_hash: bool = False, **changes) -> None:
    meta = json.loads((out / "meta.json").read_text())
    if drop_hash:
        del meta["tokenizer"]["sha256"]
    (out / "meta.json").write_text(json.dumps({**meta, **changes}))


def test_a_tokenizer_or_eot_id_that_does_not_belong_to_the_dataset_is_refused_naming_the_file(tmp_path):
    out = tmp_path / "ds"
    meta = prepare(_cfg(_jsonl(tmp_path / "d.jsonl", _docs(20))), out, progress=False)
    original = (out / "tokenizer.json").read_bytes()
    Tokenizer.train_bpe(_docs(20), 300).save(out / "tokenizer.json")  # a BPE tokenizer copied over the char one
    with pytest.raises(UserError, match=r"ds/tokenizer.json' is not the tokenizer this dataset was prepared with "
                                        r"\(SHA-256 [0-9a-f]{16}\.\.\., '.*ds/meta.json' expects"):
        load_meta(out)
    _edit_meta(out, drop_hash=True)  # a dataset prepared before the hash was recorded: the vocabulary still tells
    with pytest.raises(UserError, match=rf"tokenizer.json' has \d+ ids and end-of-text id \d+, but '.*meta.json' "
                                        rf"expects vocab_size {meta['vocab_size']} and eot_id {meta['eot_id']}"):
        load_meta(out)
    (out / "tokenizer.json").write_bytes(original)
    assert load_meta(out)["vocab_size"] == meta["vocab_size"]  # the old dataset with its own tokenizer loads
    for eot in (-1, meta["vocab_size"], str(meta["eot_id"]), float(meta["eot_id"]), True, None):
        _edit_meta(out, eot_id=eot)
        with pytest.raises(UserError, match=rf"meta.json' is damaged: 'eot_id' is .*, expected an integer in "
                                            rf"\[0, {meta['vocab_size']}\)"):
            load_meta(out)
    _edit_meta(out, eot_id=meta["eot_id"], vocab_size=2**16 + 1)
    with pytest.raises(UserError, match=r"'vocab_size' is 65537, expected an integer in \[1, 65536\] for uint16"):
        load_meta(out)
    (out / "tokenizer.json").unlink()
    _edit_meta(out, vocab_size=meta["vocab_size"])
    with pytest.raises(UserError, match="tokenizer.json' is missing"):
        load_meta(out)


def test_training_on_a_dataset_with_another_tokenizer_stops_before_any_run_directory_exists(tmp_path):
    from lmforge.config import load_train_config
    from lmforge.training.pretrain import train

    out = tmp_path / "ds"
    prepare(_cfg(_jsonl(tmp_path / "d.jsonl", _docs(20))), out, progress=False)
    Tokenizer.train_bpe(_docs(20), 300).save(out / "tokenizer.json")
    cfg = load_train_config(None, [f"data.dataset_dir={out}", f"out_dir={tmp_path / 'run'}",
                                   "model.preset=gpt2-tiny", "model.n_layer=1", "model.block_size=16"])
    with pytest.raises(UserError, match="is not the tokenizer this dataset was prepared with"):
        train(cfg, progress=False)
    assert not (tmp_path / "run").exists()


def test_default_dataset_is_prepared_once_and_reused(tmp_path, monkeypatch):
    files = [str(tmp_path / f"m{i}.py") for i in range(3)]
    for f, text in zip(files, _docs(3), strict=True):
        Path(f).write_text(text)
    monkeypatch.setattr(prep, "default_corpus_sources", lambda: files)
    monkeypatch.setattr(prep, "default_corpus_id", lambda: "py-test")
    cfg = DataConfig(tokenizer="char", workers=1)
    path = prepared_default_dataset(cfg, cache_dir=tmp_path / "cache", progress=False)
    assert path.parent == tmp_path / "cache" / "datasets" and path.name.startswith("py-test-char-")
    assert load_meta(path)["sources"] == ["<python stdlib>"]
    stamp = (path / "meta.json").stat().st_mtime_ns
    assert prepared_default_dataset(cfg, cache_dir=tmp_path / "cache", progress=False) == path
    assert (path / "meta.json").stat().st_mtime_ns == stamp
    other = prepared_default_dataset(DataConfig(tokenizer="char", workers=1, seed=2), tmp_path / "cache",
                                     progress=False)
    assert other != path


def _prepare_cli(src: Path, out: Path, env: dict | None = None, file_limit: int | None = None):
    import os
    import resource
    import subprocess
    import sys

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

    return subprocess.run([sys.executable, "-m", "lmforge", "prepare", str(src), "--out", str(out),
                           "--tokenizer", "char", "--workers", "1"], capture_output=True, text=True, timeout=HANG_S,
                          env={**os.environ, **(env or {})}, preexec_fn=limit if file_limit else None)


def test_a_killed_prepare_leaves_nothing_that_lasts_and_a_full_disk_is_one_line(tmp_path):
    src = tmp_path / "input.txt"
    src.write_text("To be, or not to be, that is the question.\n" * 2000)
    out = tmp_path / "ds"
    assert _prepare_cli(src, out, {"LMFORGE_FAULT": "mid_prepare:1"}).returncode == -9
    assert not out.exists() and len(list(tmp_path.glob("ds.tmp-*"))) == 1  # the dead process's half-work
    assert _prepare_cli(src, out).returncode == 0
    assert not list(tmp_path.glob("ds.*-*"))  # removed by the next prepare of the same output
    clean = tmp_path / "clean"
    assert _prepare_cli(src, clean).returncode == 0
    assert (out / "train.bin").read_bytes() == (clean / "train.bin").read_bytes()

    full = _prepare_cli(src, tmp_path / "full", file_limit=1000)  # train.bin outgrows the limit
    assert full.returncode == 1 and "Traceback" not in full.stderr, full.stderr
    last = full.stderr.strip().splitlines()[-1]
    assert "writing dataset" in last and "written" in last and "free" in last, last
    assert not (tmp_path / "full").exists() and not list(tmp_path.glob("full.*"))


TRICKY = ("def f(x):\n    return  x  +  1   # spaces\n\n\n" + "word " * 50 + "x" * 200 + " tail"
          + " ünïcödé ½ 日本語 text\r\ncrlf line\r\n" + "\t\t tabs then  two spaces" + "'s it's we're")


@pytest.mark.parametrize("kind", ["bpe", "wordpiece", "char"])
def test_a_document_cut_into_pieces_tokenizes_exactly_as_the_whole(kind):
    import json as json_module

    text = Path(json_module.__file__).read_text() + TRICKY * 20
    tok = (Tokenizer.train_bpe([text], 400) if kind == "bpe" else Tokenizer.train_wordpiece([text], 400)
           if kind == "wordpiece" else Tokenizer.train_char([text]))
    pieces = list(prep._document_pieces(text, size=97))
    assert "".join(pieces) == text and len(pieces) > 50
    assert [t for piece in pieces for t in tok.encode(piece)] == tok.encode(text)


def test_a_huge_single_document_prepares_to_the_same_bins_whole_or_in_pieces(tmp_path, monkeypatch):
    src = tmp_path / "one.txt"
    src.write_text(("the quick brown fox jumps over the lazy dog; " * 40 + "\n") * 40)  # one document
    for name, piece_chars in (("whole", 10**9), ("pieces", 1000)):
        monkeypatch.setattr(prep, "PIECE_CHARS", piece_chars)
        prepare(_cfg(src, tokenizer="bpe", vocab_size=300, val_fraction=0.1), tmp_path / name, progress=False)
    for f in ("train.bin", "val.bin", "tokenizer.json"):
        assert (tmp_path / "whole" / f).read_bytes() == (tmp_path / "pieces" / f).read_bytes(), f


def test_wordpiece_pieces_of_stdlib_files_tokenize_exactly_as_the_whole():
    import json.decoder
    import shlex
    import textwrap

    texts = [Path(m.__file__).read_text(encoding="utf-8") for m in (shlex, textwrap, json.decoder)]
    tok = Tokenizer.train_wordpiece(texts, 600)
    for text in texts:
        pieces = list(prep._document_pieces(text, size=211))
        assert "".join(pieces) == text and len(pieces) > 20
        assert [t for piece in pieces for t in tok.encode(piece)] == tok.encode(text)


def test_wordpiece_dataset_separates_documents_with_sep(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    texts = _docs(12)
    for i, text in enumerate(texts):
        (folder / f"doc{i:02}.txt").write_text(text, encoding="utf-8")
    meta = prepare(_cfg(folder, tokenizer="wordpiece", vocab_size=120), tmp_path / "ds", progress=False)
    tok = Tokenizer.from_file(tmp_path / "ds" / "tokenizer.json")
    assert meta["tokenizer"]["kind"] == "wordpiece" and meta["eot_id"] == tok.token_to_id("[SEP]") == 3
    assert meta["vocab_size"] == tok.vocab_size <= 120
    docs = []
    for split in ("train", "val"):
        ids = np.fromfile(tmp_path / "ds" / f"{split}.bin", dtype=meta["dtype"]).tolist()
        assert ids[-1] == 3 and ids.count(3) == meta["splits"][split]["documents"] > 0
        ends = [i for i, t in enumerate(ids) if t == 3]
        docs += [tuple(ids[start + 1:end]) for start, end in zip([-1, *ends[:-1]], ends, strict=True)]
    assert sorted(docs) == sorted(tuple(tok.encode(t)) for t in texts)
    assert 2 not in sum(docs, ())  # no [CLS]: framing is the encoder's job, not the dataset's
    assert "tokenizer: wordpiece, vocab" in format_summary(meta)


def test_an_unknown_tokenizer_kind_names_wordpiece_among_the_choices(tmp_path):
    with pytest.raises(UserError, match="data.tokenizer: expected 'bpe', 'wordpiece', 'char' or a tokenizer.json "
                                        "file, got 'bert'"):
        prepare(_cfg(tmp_path, tokenizer="bert"), tmp_path / "ds", progress=False)
