import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmforge.data.corpus import default_corpus_id, default_corpus_sources
from lmforge.data.sources import SourceStats, expand_sources, iter_documents
from lmforge.errors import UserError


def _texts(sources, **kwargs) -> list[str]:
    return [d.text for d in iter_documents([str(s) for s in sources], **kwargs)]


def test_jsonl_gives_one_document_per_line_with_line_numbers(tmp_path):
    p = tmp_path / "data.jsonl"
    p.write_text(json.dumps({"text": "first"}) + "\n\n" + json.dumps({"text": "second", "id": 2}) + "\n")
    docs = list(iter_documents([str(p)]))
    assert [(d.text, d.source, d.line) for d in docs] == [("first", str(p), 1), ("second", str(p), 3)]


def test_jsonl_reads_the_configured_field(tmp_path):
    p = tmp_path / "data.jsonl"
    p.write_text(json.dumps({"content": "héllo\nworld"}) + "\n")
    assert _texts([p], text_field="content") == ["héllo\nworld"]


@pytest.mark.parametrize("line, message", [
    ("not json", "data.jsonl:2: not valid JSON"),
    ('{"body": "x"}', "data.jsonl:2: no field 'text' (set data.text_field)"),
    ('{"text": 3}', "data.jsonl:2: field 'text' is a int"),
])
def test_bad_jsonl_line_names_file_and_line(tmp_path, line, message):
    p = tmp_path / "data.jsonl"
    p.write_text('{"text": "ok"}\n' + line + "\n")
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _texts([p])


def test_parquet_reads_rows_across_row_groups(tmp_path):
    p = tmp_path / "data.parquet"
    table = pa.table({"text": ["a", "b", None, "d", "e"], "n": [1, 2, 3, 4, 5]})
    pq.write_table(table, p, row_group_size=2)
    docs = list(iter_documents([str(p)]))
    assert [d.text for d in docs] == ["a", "b", "", "d", "e"]  # null -> empty document
    assert [d.line for d in docs] == [1, 2, 3, 4, 5]


def test_parquet_without_the_column_is_a_user_error(tmp_path):
    p = tmp_path / "data.parquet"
    pq.write_table(pa.table({"body": ["a"]}), p)
    with pytest.raises(UserError, match="no column 'text'.*body"):
        _texts([p])


def test_plain_file_is_one_document(tmp_path):
    p = tmp_path / "a.txt"
    p.write_bytes(b"line 1\r\nline 2\n\ttab")
    docs = list(iter_documents([str(p)]))
    assert len(docs) == 1 and docs[0].text == "line 1\r\nline 2\n\ttab" and docs[0].line is None


def test_folder_is_walked_recursively_sorted_skipping_hidden_and_pycache(tmp_path):
    for rel in ["b.txt", "a/z.py", "a/c.md", ".hidden.txt", ".git/config", "__pycache__/m.txt", "a/.x"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(rel)
    assert _texts([tmp_path]) == ["a/c.md", "a/z.py", "b.txt"]


def test_glob_patterns_expand_sorted(tmp_path):
    for name in ["b.txt", "a.txt", "c.md", "sub/d.txt"]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(name)
    assert _texts([tmp_path / "*.txt"]) == ["a.txt", "b.txt"]
    assert _texts([tmp_path / "**" / "*.txt"]) == ["a.txt", "b.txt", "sub/d.txt"]


def test_a_file_named_twice_is_read_once(tmp_path):
    (tmp_path / "a.txt").write_text("a")
    assert _texts([tmp_path / "a.txt", tmp_path, tmp_path / "*.txt"]) == ["a"]


def test_binary_files_are_skipped_and_counted(tmp_path):
    (tmp_path / "text.txt").write_text("hello")
    (tmp_path / "blob.bin").write_bytes(b"\x89PNG\x00\x01" * 10)
    (tmp_path / "blob.jsonl").write_bytes(b'{"text": "x"}\x00\n')
    stats = SourceStats()
    assert _texts([tmp_path], stats=stats) == ["hello"]
    assert (stats.files, stats.documents, stats.skipped_binary, stats.bytes) == (1, 1, 2, 5)


def test_invalid_utf8_is_replaced_and_counted_but_existing_replacement_chars_are_not(tmp_path):
    p = tmp_path / "mixed.txt"
    p.write_bytes(b"ok \xff\xfe then \xe2\x82 and a real \xef\xbf\xbd end")
    stats = SourceStats()
    (text,) = _texts([p], stats=stats)
    assert text == "ok \ufffd\ufffd then \ufffd and a real \ufffd end"
    assert stats.invalid_utf8 == 3


def test_invalid_utf8_inside_jsonl_and_lone_surrogates_are_counted(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"text": "a\xffb"}\n{"text": "c\\ud800d"}\n')
    stats = SourceStats()
    assert _texts([p], stats=stats) == ["a\ufffdb", "c\ufffdd"]
    assert stats.invalid_utf8 == 2


@pytest.mark.parametrize("source", ["no/such/file.txt", "no/such/*.txt"])
def test_missing_source_is_a_user_error_naming_it(tmp_path, source):
    with pytest.raises(UserError, match=source.replace("*", r"\*")):
        expand_sources([os.path.join(tmp_path, source)])


def test_default_corpus_is_the_stdlib_without_tests():
    sources = default_corpus_sources()
    assert sources == sorted(sources) and len(sources) > 100
    assert any(p.endswith("/json/decoder.py") for p in sources)
    assert all(p.endswith(".py") for p in sources)
    for excluded in ("/test/", "/tests/", "/idle_test/", "/site-packages/", "/__pycache__/"):
        assert not any(excluded in p for p in sources), excluded
    assert default_corpus_id() == default_corpus_id() and default_corpus_id().startswith("py3.")
