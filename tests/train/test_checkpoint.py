import torch

from lmforge.config import OptimConfig
from lmforge.rundir import latest_checkpoint, list_checkpoints
from lmforge.train.checkpoint import TrainerState, load_trainer_state, load_weights, save_checkpoint
from lmforge.train.optim import build_optimizer
from tests.fixtures import tiny_model


def _trained_pair():
    model = tiny_model("llama-tiny")
    opt = build_optimizer(model, OptimConfig(), torch.device("cpu"))
    x = torch.randint(0, 97, (2, 16))
    model.train()
    for _ in range(2):
        model(x, x)[1].backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_roundtrip_restores_weights_optimizer_and_rng(tmp_path):
    model, opt = _trained_pair()
    torch.manual_seed(123)
    save_checkpoint(tmp_path, model, opt, TrainerState(step=7, best_val_loss=1.5), keep_last=2)
    expected_draw = torch.rand(3)

    fresh = tiny_model("llama-tiny")
    fresh_opt = build_optimizer(fresh, OptimConfig(), torch.device("cpu"))
    ckpt = latest_checkpoint(tmp_path)
    load_weights(fresh, ckpt)
    state = load_trainer_state(ckpt, fresh_opt)
    assert state == TrainerState(step=7, best_val_loss=1.5)
    assert torch.equal(torch.rand(3), expected_draw)  # RNG continues where the checkpoint left it
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=False):
        assert torch.equal(a, b)
    sa, sb = opt.state_dict(), fresh_opt.state_dict()
    for pid in sa["state"]:
        for k in sa["state"][pid]:
            assert torch.equal(torch.as_tensor(sa["state"][pid][k]), torch.as_tensor(sb["state"][pid][k]))


def test_keep_last_k_and_half_written_checkpoints_are_ignored(tmp_path):
    model, opt = _trained_pair()
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, model, opt, TrainerState(step=step), keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000020", "step_000030"]
    # A crash mid-write leaves a .tmp folder; it is never taken for a checkpoint.
    (tmp_path / "checkpoints" / "step_000040.tmp").mkdir()
    (tmp_path / "checkpoints" / "step_000040.tmp" / "model.safetensors").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path).name == "step_000030"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000020", "step_000030"]
