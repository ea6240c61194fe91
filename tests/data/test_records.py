"""Example files: line numbers in errors, skipping bad lines, the held-out split."""

import pytest

from lmforge.data.records import ReadReport, read_records, require, split_holdout
from lmforge.errors import UserError


def _text(record: dict) -> str:
    return require(record, "text")


def test_a_line_that_is_not_json_is_named_by_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"\n{"text": "c"}\n')
    with pytest.raises(UserError, match=r"d\.jsonl:3: not valid JSON.*skip-bad-lines"):
        read_records(path, _text, skip_bad_lines=False)


def test_skip_bad_lines_continues_and_counts(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n[1, 2]\n{"txt": "b"}\nnot json\n{"text": "c"}\n')
    report = ReadReport()
    records = read_records(path, _text, skip_bad_lines=True, report=report)
    assert [(r, w.rsplit(":", 1)[1]) for r, w in records] == [("a", "1"), ("c", "5")]
    assert len(report.skipped) == 3
    assert "missing field 'text' (fields: txt)" in report.skipped[1]


def test_csv_records_and_missing_columns(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('text,label\n"two\nlines",x\nshort\n')
    with pytest.raises(UserError, match=r"d\.csv:4: expected 2 columns"):
        read_records(path, lambda r: (r["text"], r["label"]), skip_bad_lines=False)


def test_missing_file_wrong_type_and_empty_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_records(tmp_path / "nope.jsonl", _text, False)
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(UserError, match="expected a .jsonl or .csv"):
        read_records(tmp_path / "d.txt", _text, False)
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(UserError, match="no usable records"):
        read_records(tmp_path / "e.jsonl", _text, False)


def test_holdout_is_seeded_disjoint_and_complete():
    items = list(range(100))
    train, val = split_holdout(items, 0.1, seed=3)
    assert len(val) == 10 and sorted(train + val) == items
    assert split_holdout(items, 0.1, seed=3) == (train, val)
    assert split_holdout(items, 0.1, seed=4)[1] != val
