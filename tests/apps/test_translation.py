"""The translation builder on catalogs the test writes: what is kept, what is dropped and counted,
malformed files skipped, and the same bytes from the same inputs."""

from __future__ import annotations

from lmforge.apps.recipe import APPS, AppRequest, build_data
from lmforge.apps.task_records import BuildReport, read_jsonl, split_records
from lmforge.apps.translation import build_translation, message_key, placeholders

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
        outs.append([(tmp_path / name / f).read_bytes() for f in ("train.jsonl", "test.jsonl", "build.json")])
    assert outs[0] == outs[1]
    train, test = (read_jsonl(tmp_path / "a" / f) for f in ("train.jsonl", "test.jsonl"))
    assert train and test
    held = {s for r in test for s in (r["source"], r["reference"])}
    assert not held & {s for r in train for s in (r["source"], r["reference"])}
    # the two spellings of "cannot open file" share a key, hence a side
    sides = {r["source"]: side for side, rows in (("train", train), ("test", test)) for r in rows}
    assert len({sides.get("Cannot open file %s"), sides.get("cannot open file %s.")} - {None}) == 1
    # every prompt carries its nearest training example, never itself
    for r in train + test:
        assert r["source"] in r["prompt"] and train[r["neighbour"]]["source"] != r["source"]


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
