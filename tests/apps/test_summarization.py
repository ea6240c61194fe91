"""The summarization and question-answering builders on a source tree the test writes."""

from __future__ import annotations

from lmforge.apps.baselines import name_words
from lmforge.apps.qa import build_qa
from lmforge.apps.recipe import APPS, AppRequest, build_data
from lmforge.apps.summarization import build_summarization, first_sentence, lead_line, lead_name
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
    assert lead_name(r) == "read config 0" and lead_line(r) == 'def read_config0(path, encoding="utf-8", strict=False):'


def test_first_sentence_and_name_words():
    assert first_sentence("Return x.  Then more.\n\nDetails.") == "Return x."
    assert first_sentence("Spans\n  two lines. Next") == "Spans two lines."
    assert first_sentence("No full stop") == "No full stop"
    assert name_words("getHTTPResponse_code2") == "get http response code 2"


def test_qa_answers_are_spans_of_the_help_text(source_tree):
    report = BuildReport()
    records = build_qa([str(source_tree)], report)
    pairs = {r.source.rsplit("Question: ", 1)[1]: r.target for r in records if "read_config0" in r.source
             or "count_words0" in r.source or "push" in r.source}
    assert pairs == {"What is the default value of encoding in read_config0?": "'utf-8'",
                     "What is the default value of strict in read_config0?": "False",
                     "What is the default value of sep in count_words0?": "None",
                     "What does count_words0 return?": "the number of words in text",
                     "What is the default value of times in push?": "1"}
    for r in records:
        context = r.source.rsplit("\n\nQuestion: ", 1)[0]
        assert r.target in context
    assert report.dropped["classes"] == 12 and len(report.skipped_files) == 2


def test_builds_are_byte_identical_and_test_strings_stay_out_of_train(source_tree, tmp_path):
    for name in ("summarization", "qa"):
        outs = []
        for run in ("a", "b"):
            build_data(APPS[name], AppRequest(name=name, sources=[str(source_tree)], test_fraction=0.3),
                       tmp_path / name / run, say=lambda _: None)
            outs.append([(tmp_path / name / run / f).read_bytes() for f in ("train.jsonl", "test.jsonl")])
        assert outs[0] == outs[1]
        train, test = (read_jsonl(tmp_path / name / "a" / f) for f in ("train.jsonl", "test.jsonl"))
        assert train and test
        train_files = {r["origin"].rsplit(":", 1)[0] for r in train}
        assert not train_files & {r["origin"].rsplit(":", 1)[0] for r in test}  # split by file
        train_strings = {s for r in train for s in (r["source"], r["reference"])}
        assert not {r["source"] for r in test} & train_strings
        if APPS[name].distinct_targets:
            assert not {r["reference"] for r in test} & train_strings


def test_qa_baselines_include_the_most_frequent_training_answer(source_tree, tmp_path):
    from collections import Counter

    from lmforge.apps.recipe import score_baselines

    app = APPS["qa"]
    train, test = build_data(app, AppRequest(name="qa", sources=[str(source_tree)], test_fraction=0.3),
                             tmp_path, say=lambda _: None)
    nn = [r["neighbour"] for r in read_jsonl(tmp_path / "test.jsonl")]
    scores = score_baselines(app, train, test, nn)
    top, _ = Counter(r.target for r in train).most_common(1)[0]
    assert scores["most frequent answer"]["outputs"] == [top] * len(test)
    assert scores["nearest neighbour"]["outputs"] == [train[j].target for j in nn]


def test_the_qa_rule_reads_the_default_from_the_signature_and_the_return_sentence(source_tree, tmp_path):
    from lmforge.apps.qa import rule_answer

    app = APPS["qa"]
    _, test = build_data(app, AppRequest(name="qa", sources=[str(source_tree)], test_fraction=0.3), tmp_path,
                         say=lambda _: None)
    assert test and [rule_answer(r) for r in test] == [r.target for r in test]  # templated questions: all right
    odd = test[0].source.rsplit("Question: ", 1)[0] + "Question: What is the default value of nothing in f?"
    assert rule_answer(test[0].__class__("", odd, "")) == ""
