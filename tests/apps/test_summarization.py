"""The summarization and question-answering builders on a source tree the test writes."""

from __future__ import annotations

from lmforge.apps.baselines import name_words
from lmforge.apps.recipe import APPS, AppRequest, build_data
from lmforge.apps.summarization import build_summarization, first_sentence, lead, lead_line
from lmforge.apps.task_records import BuildReport, read_jsonl


def test_summaries_are_first_sentences_of_docstrings_taken_out_of_the_code(source_tree):
    report = BuildReport()
    built = build_summarization([str(source_tree)], report)
    assert len(built) == 12 * 4  # read_config, count_words, the class and its push, in each module
    records = {r.source.split("(")[0].split(":")[0]: r for r in built}
    r = records["def read_config0"]
    assert r.target == "Read the configuration file at path."
    assert r.source.startswith("def read_config0(path, encoding=\"utf-8\", strict=False):")
    assert '"""' not in r.source and "More details" not in r.source and "return f.read()" in r.source
    assert r.key == r.origin.rsplit(":", 1)[0] == "pkg/mod00.py"
    stack = records["class Stack0"]
    assert stack.target == "A last-in, first-out stack of 0 items."
    assert '"""Push an item' in stack.source  # only its own docstring is taken out
    assert report.files == 12 and len(report.skipped_files) == 2  # the syntax error and the Latin-1 file
    assert report.dropped["definitions without a docstring"] == 24  # undocumented() and __init__
    assert report.dropped["definitions that are only a docstring"] == 12
    assert lead(r) == "read config 0" and lead_line(r) == 'def read_config0(path, encoding="utf-8", strict=False):'


def test_first_sentence_and_name_words():
    assert first_sentence("Return x.  Then more.\n\nDetails.") == "Return x."
    assert first_sentence("Spans\n  two lines. Next") == "Spans two lines."
    assert first_sentence("No full stop") == "No full stop"
    assert name_words("getHTTPResponse_code2") == "get http response code 2"


def test_qa_asks_which_entry_a_first_sentence_describes_without_giving_it_or_the_name_away(source_tree):
    from lmforge.apps import qa

    report = BuildReport()
    records = qa.build_qa([str(source_tree)], report)
    assert len(records) == 12 * 4  # read_config, count_words, push and only_doc in each module; the class is not asked

    def answered(r):  # the name of the entry the answer's number points to
        return r.source.splitlines()[int(r.target) - 1].split(". ", 1)[1].split("(")[0]

    by_answer = {answered(r): r for r in records if r.key == "pkg/mod00.py"}
    assert sorted(by_answer) == ["count_words0", "only_doc", "push", "read_config0"]
    r = by_answer["count_words0"]
    context, question = r.source.split("\n\nWhich of them: ")
    assert question == "Return the number of in text."  # "words" is the name's: left out
    entries = context.splitlines()
    assert len(entries) == qa.CHOICES and f"{r.target}. count_words0(text, sep=None)" in entries
    assert [e.split(". ")[0] for e in entries] == ["1", "2", "3"]
    assert "number of words" not in context  # the first sentence is taken out of the entries
    read = by_answer["read_config0"]
    assert read.source.endswith("Which of them: the configuration file at path.")
    assert f"{read.target}. read_config0(path, encoding='utf-8', strict=False) Blank lines are ignored. More details " \
        "here." in read.source.splitlines()  # its entry: the signature and the docstring's rest
    assert {x.target for x in records} == {"1", "2", "3"}  # the entries' order is a hash's
    assert report.dropped["classes"] == 12 and len(report.skipped_files) == 2


def test_the_qa_rule_picks_the_entry_sharing_most_words_with_the_question():
    from lmforge.apps.qa import rule_answer, words
    from lmforge.apps.task_records import TaskRecord

    context = "1. open_file(path) Opens it.\n2. close(fd) Close the descriptor fd.\n3. send(data) Writes bytes."
    record = TaskRecord("", context + "\n\nWhich of them: Release the file descriptor fd.", "2")
    assert words("Release the descriptor of open_file") == {"release", "descriptor", "open", "file"}
    assert rule_answer(record) == "2"  # descriptor and fd beat open_file's file


def test_builds_are_byte_identical_and_test_strings_stay_out_of_train(source_tree, man_pages, tmp_path):
    def group(origin: str) -> str:  # a file, or a man page's family
        return origin.split(".")[0].split("-")[0] if origin.startswith("man:") else origin.rsplit(":", 1)[0]

    for name in ("summarization", "qa"):
        outs = []
        for run in ("a", "b"):
            build_data(APPS[name], AppRequest(name=name, sources=[str(source_tree), str(man_pages)],
                                              test_fraction=0.3), tmp_path / name / run, say=lambda _: None)
            outs.append([(tmp_path / name / run / f).read_bytes()
                         for f in ("train.jsonl", "test.jsonl", "pretrain.jsonl")])
        assert outs[0] == outs[1]
        train, test = (read_jsonl(tmp_path / name / "a" / f) for f in ("train.jsonl", "test.jsonl"))
        assert train and test
        if name == "summarization":
            assert {r["origin"][:4] for r in train + test} == {"man:", "pkg/"}  # both parts
        train_files = {group(r["origin"]) for r in train}
        assert not train_files & {group(r["origin"]) for r in test}  # split by file (by family)
        train_strings = {s for r in train for s in (r["source"], r["reference"])}
        assert not {r["source"] for r in test} & train_strings
        if APPS[name].distinct_targets:
            assert not {r["reference"] for r in test} & train_strings
