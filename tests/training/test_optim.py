import math

import pytest
import torch

from lmforge.config import OptimConfig
from lmforge.training.metrics import eta_seconds, format_duration, mfu
from lmforge.training.optim import build_optimizer, lr_at, param_groups
from tests.fixtures import tiny_model


def test_schedule_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10)
    lrs = [lr_at(s, cfg, 110) for s in range(130)]
    assert lrs[0] == pytest.approx(1 / 11) and lrs[9] == pytest.approx(10 / 11)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11], strict=False))
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.1 + 0.5 * 0.9)  # half-way through the cosine
    assert all(a >= b for a, b in zip(lrs[10:110], lrs[11:111], strict=False))
    assert lrs[110:] == [0.1] * 20


def test_decay_groups_exclude_biases_and_norms_and_count_tied_weights_once():
    model = tiny_model()
    decay, no_decay = param_groups(model, 0.1)
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    n = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert n == model.num_params(non_embedding=False)
    opt = build_optimizer(model, OptimConfig(), torch.device("cpu"))
    assert opt.defaults["fused"]


def test_mfu_and_eta_arithmetic():
    assert mfu(1000, 6e6, 1e12) == pytest.approx(0.006)
    assert eta_seconds(10, 5, 20) == 40
    assert format_duration(75) == "1:15" and format_duration(3725) == "1:02:05"
    assert math.isfinite(mfu(1, 1, 0))
