"""The arithmetic behind what a run reports."""

import json
import math

import pytest

from lmforge.training.metrics import MetricsLogger, bits_per_byte, perplexity


def test_bits_per_byte():
    assert bits_per_byte(math.log(2), tokens=100, n_bytes=400) == pytest.approx(0.25)


def test_perplexity_is_exp_of_the_loss_and_stays_finite_for_a_diverged_run():
    assert perplexity(math.log(7.0)) == pytest.approx(7.0)
    assert math.isfinite(perplexity(1e9))


def test_resuming_drops_the_records_past_the_checkpoint_and_a_line_torn_by_a_kill(tmp_path):
    records = [json.dumps({"step": s, "kind": "train", "loss": 1.0}) for s in range(1, 7)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(records) + '\n{"step": 7, "kind": "tr')
    logger = MetricsLogger(tmp_path, start_step=4)
    logger.log({"step": 5, "kind": "train", "loss": 2.0})
    logger.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in lines] == [(1, 1.0), (2, 1.0), (3, 1.0), (4, 1.0), (5, 2.0)]
    assert not list(tmp_path.glob("*.tmp"))


def test_tensorboard_gets_the_config_as_text_and_hparams_and_the_plot_an_lr_panel(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = MetricsLogger(tmp_path, config={"optim": {"lr": 0.002}, "train": {"patience": None}})
    for step in (5, 10):
        logger.log({"step": step, "kind": "train", "loss": 3.0 / step, "lr": 1e-3 * step})
    logger.close()
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"tensors": 0})
    events.Reload()
    assert "config/text_summary" in events.Tags()["tensors"]
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "lr: 0.002" in text and "patience: null" in text
    assert (tmp_path / "loss.png").stat().st_size > 10_000


def test_a_run_stopped_before_its_first_log_line_writes_no_empty_loss_png_and_warns_nothing(tmp_path):
    import warnings

    logger = MetricsLogger(tmp_path)
    logger.log({"step": 1, "kind": "memory", "param_bytes_per_rank": 10})  # logged, but nothing to plot
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a matplotlib warning (an empty legend, say) fails the test
        logger.close()
    assert (tmp_path / "metrics.jsonl").exists()
    assert not (tmp_path / "loss.png").exists()
