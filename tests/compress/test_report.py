"""The compression report: decode speeds timed in alternation with their spread (on a fake clock, so that what
is checked is the order and the arithmetic, never this machine's speed), and the rows each command shows."""

from __future__ import annotations

import json
import re
from functools import partial
from types import SimpleNamespace

import pytest
import torch

from lmforge.compress import llamacpp, report, timing
from lmforge.compress.gguf import export_gguf
from lmforge.compress.prune import apply_masks, magnitude_masks
from lmforge.compress.report import (
    NEW_TOKENS,
    Measured,
    Report,
    Windows,
    format_report,
    gguf_report,
    measure,
    measure_speeds,
)
from lmforge.data.tokenizer import Tokenizer
from lmforge.loading import LoadedRun
from lmforge.runtime import setup_runtime
from tests.fixtures import tiny_model

LOAD = [1.0, 3.0, 1.0, 2.0, 1.0]
"""The machine's slowdown in each timed round (other work coming and going)."""


class FakeMachine:
    """generate() on a fake clock: a model's decode takes its own seconds times the load of the current round;
    every call is logged."""

    def __init__(self, seconds: dict[str, list[float]]):
        self.seconds, self.now, self.calls = seconds, 0.0, []

    def clock(self) -> float:
        return self.now

    def generate(self, model, prompts, new_tokens, temperature):
        per_batch = 2 * (1 + len(LOAD))  # a warm-up of each model, then the rounds
        call = len(self.calls) % per_batch
        self.calls.append(model)
        rnd = call // 2 - 1
        self.now += 5.0 if rnd < 0 else self.seconds[model][rnd] * LOAD[rnd]


def _cells(table: str, label: str) -> list[str]:
    """The cells after ``label`` in its row of the printed table (columns are two or more spaces apart)."""
    rows = [line[len(label):] for line in table.splitlines() if line.startswith(label + "  ")]
    assert len(rows) == 1, table
    return re.split(r"\s{2,}", rows[0].strip())


def _measured() -> Measured:
    return Measured(linear_bytes=2**20, linear_bf16_bytes=2**20, file_bytes=None, val_loss=None, val_ppl=None)


def _timed(monkeypatch, seconds: dict[str, list[float]]) -> tuple[FakeMachine, Report]:
    machine = FakeMachine(seconds)
    monkeypatch.setattr(report, "generate", machine.generate)
    monkeypatch.setattr(report, "time_alternating", partial(timing.time_alternating, clock=machine.clock))
    before, after = _measured(), _measured()
    windows = Windows(torch.zeros(8, 33, dtype=torch.long), "zeros")
    measure_speeds([("before", before), ("after", after)], None, windows, setup_runtime("cpu", "fp32"))
    return machine, Report(command="quantize", source="src", out="out", method={"method": "int8"}, before=before,
                           after=after, windows=None, n_windows=0, device="cpu")


def test_before_and_after_are_timed_in_alternation_and_reported_with_their_spread(monkeypatch, tmp_path):
    machine, r = _timed(monkeypatch, {"before": [1.0] * 5, "after": [0.5] * 5})
    assert machine.calls == ["before", "after"] * (1 + len(LOAD)) * 2  # warm-ups, then 5 rounds; batch 1 and 8
    # The load moves each model's speed 3x between rounds, yet the ratio within every round is 2.
    speeds = [NEW_TOKENS / load for load in LOAD]
    assert r.before.decode_spread["1"].rounds == pytest.approx(speeds)
    assert (r.before.decode_spread["1"].min, r.before.decode_spread["1"].max) == pytest.approx((32 / 3, 32))
    assert r.before.decode_tokens_per_s["1"] == pytest.approx(32.0)  # the median
    assert r.after.decode_vs_before["1"].rounds == pytest.approx([2.0] * 5)
    assert not r.before.decode_vs_before
    text = format_report(r)
    assert _cells(text, "decode tok/s, batch 1") == ["32.0 (10.7-32.0)", "64.0 (21.3-64.0)", "2.000x (2.00-2.00x)"]
    assert "alternation (a warm-up of each, then 5 rounds): median (min-max)" in text
    written = json.loads(r.write(tmp_path).read_text())
    assert written["after"]["decode_spread"]["8"]["median"] == pytest.approx(8 * 64.0)
    assert set(written["after"]["decode_vs_before"]["8"]) == {"median", "min", "max", "rounds"}


def test_a_ratio_whose_rounds_disagree_says_no_measurable_difference(monkeypatch):
    # After is faster in some rounds and slower in others: no speed-up or slow-down is claimed.
    _, r = _timed(monkeypatch, {"before": [1.0] * 5, "after": [0.9, 1.1, 0.95, 1.05, 1.0]})
    text = format_report(r)
    for batch in (1, 8):
        assert _cells(text, f"decode tok/s, batch {batch}")[-1] == "no measurable difference (0.91-1.11x)", text


def test_prune_reports_the_zeros_and_quantize_the_size_relative_to_bf16():
    rt = setup_runtime("cpu", "fp32")
    dense = tiny_model()
    pruned = tiny_model()
    apply_masks(pruned, magnitude_masks(pruned, 0.5))
    before, after = measure(dense, None, rt, None), measure(pruned, None, rt, None)
    assert (before.linear_zero_fraction, after.linear_zero_fraction) == (0.0, 0.5)
    r = Report(command="prune", source="src", out="out", method={"method": "magnitude"}, before=before, after=after,
               windows=None, n_windows=0, device="cpu")
    text = format_report(r)
    assert "of bf16's" not in text  # zeros stored dense: the same bytes, so a size ratio would say nothing
    assert _cells(text, "  of them zero") == ["0.0%", "50.0%"]  # before, after; no ratio
    r.command = "quantize"
    assert "of bf16's" in format_report(r) and "of them zero" not in format_report(r)


@pytest.fixture
def exported(tmp_path) -> tuple[LoadedRun, object]:
    """A tiny Llama-style model with a tokenizer of its own, as a run (no dataset, no checkpoint folder), and its
    f16 GGUF export."""
    tok = Tokenizer.train_bpe(["the quick brown fox jumps over the lazy dog", "hello world, hello there"], 300)
    model = tiny_model("llama-tiny", vocab_size=tok.vocab_size, n_layer=1, n_embd=64, block_size=64)
    return LoadedRun(model, tok, None, tmp_path, tmp_path), export_gguf(model, tok, tmp_path / "m.gguf")


def test_the_gguf_report_times_llama_cpp_decoding_the_file_beside_lmforge(exported, monkeypatch):
    pytest.importorskip("llama_cpp")
    # llama.cpp's verdict on the file takes seconds and is tested on its own (test_llamacpp.py).
    monkeypatch.setattr(llamacpp, "agreement", lambda *a, **k: SimpleNamespace(summary=lambda: "agreement"))
    run, path = exported
    r = gguf_report(run, run.model, path, "f16")
    for measured in (r.before, r.after):  # before: lmforge; after: llama.cpp running the file
        assert measured.decode_tokens_per_s["1"] > 0
        assert len(measured.decode_spread["1"].rounds) == report.GGUF_ROUNDS
    assert r.after.decode_vs_before["1"].median > 0
    text = format_report(r)
    assert len(_cells(text, "decode tok/s, batch 1")) == 3  # before, after, and their ratio
    assert "decode speed is llama.cpp's running the file" in text


def test_without_llama_cpp_the_gguf_report_says_the_decode_speed_is_not_measured(exported, monkeypatch):
    monkeypatch.setattr(llamacpp, "available", lambda: False)
    run, path = exported
    r = gguf_report(run, run.model, path, "f16")
    assert not r.before.decode_spread and not r.after.decode_spread
    assert r.notes[0].endswith("; decode speed is llama.cpp's")
    assert "decode tok/s" not in format_report(r)
