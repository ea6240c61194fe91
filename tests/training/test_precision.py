"""train.precision=auto decides by measuring the model's step (issue 14), never by a CPU flag."""

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.training import precision
from lmforge.training.precision import choose_precision, decide, time_train_step

TINY = ModelConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """A cache of this test's own: the timings are cached per machine and shape."""
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))


def fake_measurement(monkeypatch, fp32_s: float, bf16_s: float | None, loss_gap: float = 0.001) -> list:
    """Replace the timing of the model with these figures."""
    calls = []

    def measure(cfg, device):
        calls.append(cfg)
        return {"fp32_s": fp32_s, "bf16_s": bf16_s, "bf16_gemm": 0.01 if bf16_s is None else 2.0,
                "loss_gap": None if bf16_s is None else loss_gap}
    monkeypatch.setattr(precision, "measure_precisions", measure)
    return calls


def test_auto_picks_bf16_where_it_measured_at_least_1_2x_faster(monkeypatch):
    fake_measurement(monkeypatch, fp32_s=1.0, bf16_s=0.55)
    choice = choose_precision("auto", TINY, torch.device("cpu"))
    assert choice.precision == "bf16"
    assert choice.reason == "auto: bf16 measured 1.82x fp32 on this model"


def test_auto_keeps_fp32_where_bf16_is_not_fast_enough_or_not_correct(monkeypatch):
    fake_measurement(monkeypatch, fp32_s=1.0, bf16_s=0.9)  # 1.11x: not worth its rounding
    assert choose_precision("auto", TINY, torch.device("cpu")).precision == "fp32"
    assert decide({"fp32_s": 1.0, "bf16_s": 0.5, "bf16_gemm": 2.0, "loss_gap": 0.3}).precision == "fp32"
    assert decide({"fp32_s": 1.0, "bf16_s": 0.5, "bf16_gemm": 2.0, "loss_gap": float("nan")}).precision == "fp32"
    slow = decide({"fp32_s": 1.0, "bf16_s": None, "bf16_gemm": 0.006, "loss_gap": None})
    assert (slow.precision, slow.reason) == ("fp32", "auto: bf16 GEMMs measured 0.006x fp32 here")


def test_a_forced_precision_is_not_measured(monkeypatch):
    calls = fake_measurement(monkeypatch, fp32_s=1.0, bf16_s=0.5)
    choice = choose_precision("fp32", TINY, torch.device("cpu"))
    assert (choice.precision, choice.reason, calls) == ("fp32", "train.precision=fp32", [])


def test_the_measurement_is_cached_per_model_shape(monkeypatch):
    calls = fake_measurement(monkeypatch, fp32_s=1.0, bf16_s=0.5)
    for _ in range(2):
        choose_precision("auto", TINY, torch.device("cpu"))
    choose_precision("auto", ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32),
                     torch.device("cpu"))
    assert len(calls) == 2


def test_timing_a_step_leaves_the_runs_random_state_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    seconds, loss = time_train_step(TINY, torch.device("cpu"), None, repeats=1)
    assert seconds > 0 and abs(loss - torch.log(torch.tensor(64.0)).item()) < 0.5
    assert torch.equal(torch.rand(3), expected)
