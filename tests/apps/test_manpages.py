"""The man-page reader behind summarization's prose part."""

from __future__ import annotations

from lmforge.apps import manpages
from lmforge.apps.summarization import build_summarization, lead, lead_line, part, summarization_prompt
from lmforge.apps.task_records import BuildReport


def test_a_page_becomes_its_description_in_and_its_name_line_out(man_pages):
    report = BuildReport()
    records = {r.origin: r for r in manpages.build_manpages([str(man_pages)], report)}
    assert sorted(records) == sorted([f"man:tool-{i}.1" for i in range(12)] + ["man:mtool.8"])
    tool = records["man:tool-3.1"]
    assert tool.target == "count the lines of 3 files" and tool.key == "man:tool"
    assert tool.source == ("Count the lines in each FILE and print the totals - one line per file, then the sum. "
                           "With no FILE, or when FILE is -, read standard input. -c, --bytes print the byte counts "
                           "tool(1) is fast.")
    mdoc = records["man:mtool.8"]
    assert mdoc.target == "manage the widget daemon"
    assert mdoc.source.startswith("The mtool utility starts, stops and queries the widget daemon that serves "
                                  "/run/widget and prints")
    assert report.files == 15 and list(report.skipped_files) == [str(man_pages / "man1" / "broken.1.gz")]
    assert report.dropped["pages that include another (.so)"] == 1
    assert report.dropped[f"pages with a DESCRIPTION under {manpages.MIN_WORDS} words"] == 1


def test_a_family_is_capped_by_a_hash_of_the_names(man_pages, monkeypatch):
    monkeypatch.setattr(manpages, "MAX_FAMILY", 5)
    report = BuildReport()
    kept = [r for r in manpages.build_manpages([str(man_pages)], report) if r.origin.startswith("man:tool")]
    assert len(kept) == 5 and report.dropped["pages past 5 of one family"] == 7
    again = [r for r in manpages.build_manpages([str(man_pages)], BuildReport()) if r.origin.startswith("man:tool")]
    assert kept == again


def test_summarization_reads_code_and_pages_with_each_part_its_own_lead(man_pages, source_tree):
    records = build_summarization([str(source_tree), str(man_pages)], BuildReport())
    pages = [r for r in records if r.origin.startswith("man:")]
    code = [r for r in records if not r.origin.startswith("man:")]
    assert len(pages) == 13 and len(code) == 48
    page = next(r for r in pages if r.origin == "man:tool-3.1")
    assert lead(page) == "Count the lines in each FILE and print the totals - one line per file, then the sum."
    assert lead_line(page) == "Count the lines in each FILE and print"
    assert summarization_prompt(page, page).endswith("\n\nName: tool-3")
    assert part({"origin": page.origin}) == "man pages" and part({"origin": code[0].origin}) == "code"


def test_each_part_is_judged_against_its_own_strongest_baseline():
    from lmforge.apps.recipe import by_part, format_parts, summarize_seeds
    from lmforge.apps.summarization import APP

    rows = [{"origin": "pkg/a.py:1", "reference": "Return the sum of values."},
            {"origin": "pkg/b.py:9", "reference": "Open the file for reading."},
            {"origin": "man:ls.1", "reference": "list directory contents"},
            {"origin": "man:cp.1", "reference": "copy files and directories"}]
    refs = [r["reference"] for r in rows]
    model = [refs[0], "Close it.", "list directory contents", "copy files and directories"]  # man pages all right
    baselines = {"lead": {"outputs": [refs[0], refs[1], "list", "copy"]},  # code all right
                 "nearest neighbour": {"outputs": ["Return it.", "Open it.", "list files", "copy files"]}}
    parts = by_part(APP, rows, model, baselines)
    assert list(parts) == ["code", "man pages"] and parts["code"]["examples"] == 2
    assert parts["code"]["bar"] == {"baseline": "lead", "value": 100.0} and not parts["code"]["beats_bar"]
    assert parts["man pages"]["bar"]["baseline"] == "nearest neighbour" and parts["man pages"]["beats_bar"]
    assert parts["man pages"]["model"]["rougeL"] == 100.0
    table = format_parts(APP, {"parts": parts})
    assert "| code (2) |" in table and "**100.00**" in table
    runs = [{"app": "summarization", "metric": "rougeL", "seed": s, "model": {"rougeL": 50.0 + s},
             "bar": {"baseline": "lead", "value": 40.0}, "parts": parts} for s in (0, 1)]
    summary = summarize_seeds(runs)
    assert summary["mean"] == 50.5 and summary["parts"]["code"]["values"] == [parts["code"]["model"]["rougeL"]] * 2
