"""The translation builder on catalogs the test writes: what is kept, what is dropped and counted,
malformed files skipped, and the same bytes from the same inputs."""

from __future__ import annotations

import json

import pytest

from lmforge.apps.recipe import APPS, PRETRAIN_DOC_TEXTS, AppRequest, build_data, write_pretraining_text
from lmforge.apps.task_records import BuildReport, TaskRecord, read_jsonl, split_records
from lmforge.apps.translation import breakdown, build_translation, message_key, placeholders

from .conftest import DROPPED, MESSAGES


def test_kept_messages_are_the_translated_ones_and_the_rest_is_counted(catalogs):
    report = BuildReport()
    records = build_translation([str(catalogs)], "de", report)
    assert sorted((r.source, r.target) for r in records) == sorted(MESSAGES)
    assert report.files == 2
    assert set(report.skipped_files) == {str(catalogs / "broken.mo"), str(catalogs / "broken.po")}
    for _, reason in DROPPED:
        # msgfmt leaves fuzzy entries out of a .mo; this one is in the .po, which keeps them marked
        assert report.dropped[reason] == 1, reason


def test_placeholders_may_move_but_must_all_be_there():
    assert placeholders("Copy %1$s to %2$d") == placeholders("%2$d nach %1$s")
    assert placeholders("%(name)s is {0}, 100%%") == placeholders("{0} ist %(name)s")
    assert placeholders("Read %s bytes") != placeholders("Lese Bytes")
    assert message_key("Cannot open  file %s.") == message_key("cannot open file %s")


def test_same_catalogs_give_the_same_bytes_and_no_test_string_in_train(catalogs, tmp_path):
    app = APPS["translation"]
    req = AppRequest(name="translation", sources=[str(catalogs)], test_fraction=0.3, lang="de")
    outs = []
    for name in ("a", "b"):
        build_data(app, req, tmp_path / name, say=lambda _: None)
        outs.append([(tmp_path / name / f).read_bytes()
                     for f in ("train.jsonl", "test.jsonl", "dev.jsonl", "finetune.jsonl", "pretrain.jsonl",
                               "build.json")])
    assert outs[0] == outs[1]
    train, test, dev, rows = (read_jsonl(tmp_path / "a" / f)
                              for f in ("train.jsonl", "test.jsonl", "dev.jsonl", "finetune.jsonl"))
    assert train and test and dev
    held = {s for r in test for s in (r["source"], r["reference"])}
    assert not held & {s for r in train + rows for s in (r["source"], r["reference"])}
    # fine-tuning: the training records less the dev ones (held out for validation and the memory threshold)
    fit = [r for r in rows if not r.get("self_match")]
    assert sorted(fit + dev, key=train.index) == train and not {r["source"] for r in fit} & {r["source"] for r in dev}
    # the base's pretraining text is the fine-tuning messages and their translations, nothing else
    docs = [d["text"] for d in read_jsonl(tmp_path / "a" / "pretrain.jsonl")]
    texts = [t for r in fit for t in (r["source"], r["reference"])]
    assert docs == ["\n".join(texts[i:i + PRETRAIN_DOC_TEXTS]) for i in range(0, len(texts), PRETRAIN_DOC_TEXTS)]
    build = json.loads((tmp_path / "a" / "build.json").read_text())
    assert build["pretraining"]["test inputs or references among them"] == 0
    # a share of the training records is also given with itself as the memory's match, and only those
    selves = [r for r in rows if r.get("self_match")]
    assert selves and all(r["prompt"] == app.prompt(*[TaskRecord("", r["source"], r["reference"])] * 2)
                                for r in selves)
    assert {r["source"] for r in selves} < {r["source"] for r in fit}
    # every test record's similarity to its memory match, as the retrieval measured it (rounded)
    assert all(0 <= r["similarity"] < 1 for r in test)
    # the two spellings of "cannot open file" share a key, hence a side
    sides = {r["source"]: side for side, rows in (("train", train), ("test", test)) for r in rows}
    assert len({sides.get("Cannot open file %s"), sides.get("cannot open file %s.")} - {None}) == 1
    # every other prompt carries its nearest training example, never itself
    for r in train + test:
        assert r["source"] in r["prompt"] and train[r["neighbour"]]["source"] != r["source"]
        assert train[r["neighbour"]]["reference"] in r["prompt"]


def test_pretraining_text_with_a_test_string_is_refused(tmp_path):
    test = [TaskRecord(key="k", source="Quit", target="Beenden")]
    with pytest.raises(RuntimeError, match="1 pretraining texts are test inputs or references"):
        write_pretraining_text(["Open", "Beenden"], test, tmp_path / "pretrain.jsonl")
    assert not (tmp_path / "pretrain.jsonl").exists()


def test_the_report_counts_chrf_by_memory_band_and_placeholders_kept():
    rows = [{"source": "Open %s", "reference": "%s öffnen", "similarity": 0.95},
            {"source": "Quit", "reference": "Beenden", "similarity": 0.5},
            {"source": "Copy %1$s to %2$s", "reference": "%2$s aus %1$s kopieren", "similarity": 0.8}]
    got = breakdown(rows, ["%s öffnen", "Beenden", "%1$s kopieren"])
    assert {b: v["examples"] for b, v in got["bands"].items()} == {"≥ 0.9": 1, "0.7-0.9": 1, "< 0.7": 1}
    assert got["bands"]["≥ 0.9"]["chrf"] == 100.0 and got["bands"]["0.7-0.9"]["chrf"] < 100.0
    assert got["placeholders_kept"] == pytest.approx(200 / 3) and got["placeholders_kept_where_any"] == 50.0
    assert got["with_placeholders"] == 2


def test_split_drops_train_records_that_share_a_string_with_test():
    from lmforge.apps.task_records import TaskRecord, in_test

    keys = [f"k{i}" for i in range(200)]
    test_key = next(k for k in keys if in_test(k, 0.5, 0))
    train_key = next(k for k in keys if not in_test(k, 0.5, 0))
    records = [TaskRecord(test_key, "Hello", "Hallo"), TaskRecord(train_key, "Hi", "Hallo"),
               TaskRecord(train_key, "Bye", "Tschüss")]
    report = BuildReport()
    train, test = split_records(records, 0.5, 0, report)
    assert [r.source for r in test] == ["Hello"] and [r.source for r in train] == ["Bye"]
    assert report.dropped["train records sharing a string with test"] == 1
    train, _ = split_records(records, 0.5, 0, BuildReport(), distinct_targets=False)
    assert [r.source for r in train] == ["Bye", "Hi"]


def crafted_mo(path, entries: int, shared: bytes) -> None:
    """A .mo whose ``entries`` translations all point at one string ``shared`` (msgids distinct and short)."""
    import struct

    ids = [f"m{i}".encode() + b"\0" for i in range(entries)]
    tables = 28 + 16 * entries
    id_offsets, at = [], tables
    for s in ids:
        id_offsets.append(at)
        at += len(s)
    head = struct.pack("<7I", 0x950412DE, 0, entries, 28, 28 + 8 * entries, 0, 0)
    originals = b"".join(struct.pack("<II", len(s) - 1, o) for s, o in zip(ids, id_offsets, strict=True))
    translations = struct.pack("<II", len(shared), at) * entries
    path.write_bytes(head + originals + translations + b"".join(ids) + shared + b"\0")


def test_a_mo_whose_entries_share_one_long_string_is_skipped_without_expanding_it(catalogs):
    import tracemalloc

    bomb = catalogs / "bomb.mo"
    crafted_mo(bomb, 2_000, b"x" * 100_000)  # 140 KB on disk, 200 MB once every entry is read
    report = BuildReport()
    tracemalloc.start()
    try:
        records = build_translation([str(catalogs)], "de", report)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5 * 2**20, peak  # the tables are read, never the strings they point at
    assert "2,000 entries' strings add up to 200,0" in report.skipped_files[str(bomb)]
    assert sorted((r.source, r.target) for r in records) == sorted(MESSAGES)  # the other catalogs are still read
    # within the bound, the same layout is an ordinary catalog
    crafted_mo(bomb, 3, b"y" * 10)
    assert len(build_translation([str(bomb)], "de", BuildReport())) == 3


def test_the_memory_answers_above_the_threshold_chosen_on_dev_records():
    from lmforge.apps.recipe import choose_threshold, with_memory

    memory = [TaskRecord("", "Open file", "Datei öffnen"), TaskRecord("", "Quit now", "Jetzt beenden")]
    rows = [{"neighbour": 0, "similarity": 0.92, "reference": "Datei öffnen"},  # the memory is right, the model not
            {"neighbour": 1, "similarity": 0.75, "reference": "Beenden"},  # the model is right, the memory not
            {"neighbour": 0, "similarity": 0.3, "reference": "Hilfe"}]
    outputs = ["Öffnen", "Beenden", "Hilfe"]
    assert with_memory(rows, outputs, memory, 0.8) == ["Datei öffnen", "Beenden", "Hilfe"]
    assert with_memory(rows, outputs, memory, 0.7) == ["Datei öffnen", "Jetzt beenden", "Hilfe"]
    threshold, curve = choose_threshold(APPS["translation"], rows, outputs, memory)
    assert threshold == 0.9 and curve["0.9"] == max(curve.values()) > curve["0.7"] and curve["0.9"] > curve["1.01"]
