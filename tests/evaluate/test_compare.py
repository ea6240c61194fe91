"""`lmforge compare`: final metrics side by side and one PNG of every run's curves."""

import json

import pytest

from lmforge.errors import UserError
from lmforge.evaluate.compare import compare_runs, format_comparison, loss_figure


def _run(folder, losses, val):
    folder.mkdir()
    records = [{"step": i + 1, "kind": "train", "loss": v, "tokens_per_s": 100.0, "time_s": float(i)}
               for i, v in enumerate(losses)]
    records.append({"step": len(losses), "kind": "eval", "val_loss": val, "val_bpb": val / 2})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(folder)


def test_final_metrics_side_by_side_and_one_png(tmp_path):
    a = _run(tmp_path / "a", [3.0, 2.0, 1.5], 1.6)
    b = _run(tmp_path / "b", [3.0, 2.5], 2.4)
    rows, png = compare_runs([a, b], tmp_path / "out" / "cmp.png")
    assert [m["val_loss"] for _, m in rows] == [1.6, 2.4]
    assert rows[0][1]["steps"] == 3 and rows[1][1]["train_loss"] == 2.5
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = format_comparison(rows)
    assert "val_bpb" in table and "0.8000" in table and "1.2000" in table
    assert rows[0][1]["time_s"] == 2.0  # no done record: the last train record's time


def test_the_time_is_the_one_the_run_printed_when_it_finished(tmp_path):
    run = _run(tmp_path / "a", [3.0, 2.0], 1.6)
    with open(f"{run}/metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 2, "kind": "done", "time_s": 7.5}) + "\n")  # final evaluation included
    assert compare_runs([run], tmp_path / "cmp.png")[0][0][1]["time_s"] == 7.5


def test_a_folder_without_metrics_is_named(tmp_path):
    with pytest.raises(UserError, match="no metrics.jsonl"):
        compare_runs([str(tmp_path)], tmp_path / "x.png")


def test_bpb_puts_runs_with_different_tokenizers_on_one_axis(tmp_path):
    import math

    from lmforge.evaluate.compare import _bits_per_byte_factor

    chars, bpe = _run(tmp_path / "char", [3.0, 2.0], 1.6), _run(tmp_path / "bpe", [6.0, 4.0], 3.2)
    for run, tokens in ((chars, 1000), (bpe, 250)):  # the same 1000 bytes, 4 bytes per BPE token
        (tmp_path / run / "dataset_meta.json").write_text(json.dumps({"splits": {"train": {"tokens": tokens,
                                                                                           "bytes": 1000}}}))
    # 2 nats per character and 8 nats per 4-byte token are the same 2 / ln 2 bits per byte
    assert 2.0 * _bits_per_byte_factor(chars) == 8.0 * _bits_per_byte_factor(bpe) == 2.0 / math.log(2)
    assert compare_runs([chars, bpe], tmp_path / "bpb.png", bpb=True)[1].is_file()
    with pytest.raises(UserError, match="no readable dataset_meta.json"):
        compare_runs([_run(tmp_path / "imported", [1.0], 1.0)], tmp_path / "x.png", bpb=True)


def test_a_run_with_a_single_logged_point_still_shows_in_the_png(tmp_path):
    import matplotlib.pyplot as plt

    one = _run(tmp_path / "one", [2.0], 1.9)  # one train record, one eval record
    many = _run(tmp_path / "many", [3.0 - i / 100 for i in range(100)], 1.6)
    fig = loss_figure([(one, _records(one)), (many, _records(many))])
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    plt.close(fig)
    # A one-point line has no length: only a marker draws it.
    for label in ("one train", "one val"):
        assert len(lines[label].get_xdata()) == 1 and lines[label].get_marker() not in (None, "None", "", " ")
    assert lines["many train"].get_marker() in (None, "None", "", " ")  # a dense curve stays a plain line


def _records(run):
    return [json.loads(line) for line in open(f"{run}/metrics.jsonl")]
