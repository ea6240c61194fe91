import math

import pytest
import torch

from lmforge.config import OptimConfig
from lmforge.training.metrics import eta_seconds, format_duration, mfu
from lmforge.training.optim import Muon, build_optimizer, lr_at, param_groups, set_lr
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


def test_wsd_holds_the_peak_then_decays_linearly_over_the_last_fraction():
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, schedule="wsd", decay_fraction=0.25)
    lrs = [lr_at(s, cfg, 110) for s in range(120)]
    assert lrs[9] == pytest.approx(10 / 11)
    assert lrs[10:85] == [1.0] * 75  # stable until the last quarter of the 100 steps after the warmup
    assert lrs[85] == pytest.approx(1.0) and lrs[97] == pytest.approx(1.0 - 12 / 25 * 0.9)
    assert all(a > b for a, b in zip(lrs[85:110], lrs[86:111], strict=False))
    assert lrs[110:] == [0.1] * 10


def _grads(model, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)


def test_muon_takes_the_block_matrices_and_adamw_the_rest():
    model = tiny_model(tie_embeddings=False)
    opt = build_optimizer(model, OptimConfig(name="muon", lr=1e-3, muon_lr=0.02), torch.device("cpu"))
    muon, adamw = opt.parts
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    assert in_muon == {id(p) for p in model.blocks.parameters() if p.dim() == 2}
    assert {id(p) for g in adamw.param_groups for p in g["params"]} == {id(p) for p in model.parameters()} - in_muon
    set_lr(opt, 5e-4)  # the schedule's lr; Muon's groups scale it by muon_lr / lr
    assert [g["lr"] for g in muon.param_groups] == [pytest.approx(1e-2)]
    assert {g["lr"] for g in adamw.param_groups} == {5e-4}


def test_our_muon_in_bf16_updates_exactly_as_pytorchs():
    """Only the dtype of the Newton-Schulz iteration is ours to choose; in bf16 it is PyTorch's Muon."""
    ours, theirs = tiny_model(), tiny_model()
    mats = lambda m: [p for p in m.blocks.parameters() if p.dim() == 2]  # noqa: E731
    kw = {"lr": 0.02, "weight_decay": 0.01, "momentum": 0.95}
    a, b = Muon(mats(ours), ns_dtype=torch.bfloat16, **kw), torch.optim.Muon(mats(theirs), **kw)
    for seed in range(3):
        _grads(ours, seed)
        _grads(theirs, seed)
        a.step()
        b.step()
    for p, q in zip(mats(ours), mats(theirs), strict=True):
        assert torch.equal(p, q)


def test_the_muon_adamw_state_round_trips_through_a_checkpoint(tmp_path):
    from lmforge.training.checkpoint import TrainerState, load_trainer_state, save_checkpoint

    cfg = OptimConfig(name="muon")
    model, twin = tiny_model(), tiny_model()
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    for seed in range(2):
        _grads(model, seed)
        opt.step()
    ckpt = save_checkpoint(tmp_path, model, opt, TrainerState(step=2), keep_last=1)
    twin.load_state_dict(model.state_dict())
    twin_opt = build_optimizer(twin, cfg, torch.device("cpu"))
    load_trainer_state(ckpt, twin_opt)
    for m, o in ((model, opt), (twin, twin_opt)):
        _grads(m, 7)
        o.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)
