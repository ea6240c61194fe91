import pytest
import torch

from lmforge.config import OptimConfig
from lmforge.errors import StorageError, UserError
from lmforge.rundir import latest_checkpoint, list_checkpoints, resolve_checkpoint
from lmforge.training.checkpoint import TrainerState, load_trainer_state, load_weights, save_checkpoint
from lmforge.training.optim import build_optimizer
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


def _three_checkpoints(tmp_path):
    model, opt = _trained_pair()
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, model, opt, TrainerState(step=step), keep_last=3)
    return model


def _damage(path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[:len(data) // 2])
    elif how == "garbage":  # same size, other bytes: only the hash can tell
        path.write_bytes(bytes(b ^ 0x5A for b in data))
    else:
        path.unlink()


@pytest.mark.parametrize("name", ["model.safetensors", "trainer.safetensors", "trainer.json"])
@pytest.mark.parametrize("how", ["truncate", "garbage", "delete"])
def test_a_damaged_newest_checkpoint_is_skipped_for_the_newest_valid_one(tmp_path, name, how):
    _three_checkpoints(tmp_path)
    _damage(tmp_path / "checkpoints" / "step_000030" / name, how)
    reason = "no weights" if (name, how) == ("model.safetensors", "delete") else name
    with pytest.warns(UserWarning, match=f"skipped checkpoint .*step_000030.*{reason}"):
        assert latest_checkpoint(tmp_path).name == "step_000020"


@pytest.mark.parametrize("manifest", [b"\xd6\x00garbage", b'{"files": []}', b'{"files": {"model.safetensors": 5}}',
                                      b'{"files": {"../x": {"size": 1, "sha256": "0"}}}', b"[]"])
def test_a_manifest_of_another_shape_is_damage_not_a_crash(tmp_path, manifest):
    _three_checkpoints(tmp_path)
    (tmp_path / "checkpoints" / "step_000030" / "manifest.json").write_bytes(manifest)
    with pytest.warns(UserWarning, match="step_000030.*manifest.json is damaged"):
        assert latest_checkpoint(tmp_path).name == "step_000020"


@pytest.mark.parametrize("pointer", [b"\xd6\xff\x00binary", b"../../../etc", b"step_000010"])
def test_a_damaged_or_foreign_latest_pointer_still_finds_a_valid_checkpoint(tmp_path, pointer):
    _three_checkpoints(tmp_path)
    (tmp_path / "checkpoints" / "latest").write_bytes(pointer)
    expected = "step_000010" if pointer == b"step_000010" else "step_000030"  # latest names the one to load
    assert latest_checkpoint(tmp_path).name == expected


def test_checkpoints_without_a_manifest_are_still_checked_by_opening_their_files(tmp_path):
    _three_checkpoints(tmp_path)
    newest = tmp_path / "checkpoints" / "step_000030"
    (newest / "manifest.json").unlink()  # as written before manifests existed
    assert latest_checkpoint(tmp_path) == newest
    _damage(newest / "model.safetensors", "truncate")
    with pytest.warns(UserWarning, match="model.safetensors does not open"):
        assert latest_checkpoint(tmp_path).name == "step_000020"


def test_no_valid_checkpoint_is_one_user_error_naming_the_damage(tmp_path):
    (tmp_path / "run.json").write_text('{"kind": "pretrain", "task": "lm"}')
    _three_checkpoints(tmp_path)
    for step in (10, 20, 30):
        _damage(tmp_path / "checkpoints" / f"step_{step:06d}" / "model.safetensors", "truncate")
    with pytest.raises(UserError, match="no valid checkpoint .3 damaged; newest step_000030: model.safetensors has"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(UserError, match="step_000020' is damaged: model.safetensors has"):
        resolve_checkpoint(tmp_path / "checkpoints" / "step_000020")


def test_a_failed_write_leaves_no_temporary_directory_and_latest_where_it_was(tmp_path, monkeypatch):
    import lmforge.training.checkpoint as ckpt_module

    model, opt = _trained_pair()
    real_save_file = ckpt_module.save_file

    def disk_full(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_module, "save_file", disk_full)
    with pytest.raises(StorageError, match="step_000010' failed: .*no checkpoint of this run was written yet"):
        save_checkpoint(tmp_path, model, opt, TrainerState(step=10), keep_last=1)
    monkeypatch.setattr(ckpt_module, "save_file", real_save_file)
    save_checkpoint(tmp_path, model, opt, TrainerState(step=10), keep_last=1)
    monkeypatch.setattr(ckpt_module, "save_file", disk_full)
    with pytest.raises(StorageError, match="writing checkpoint .*step_000020' failed: No space left on device .*free"
                       ".*the previous checkpoint is intact"):
        save_checkpoint(tmp_path, model, opt, TrainerState(step=20), keep_last=1)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_000010"]
    assert latest_checkpoint(tmp_path).name == "step_000010"  # and keep_last=1 rotated nothing away


def test_a_stale_temporary_directory_from_a_dead_writer_is_removed_by_the_next_save(tmp_path):
    model, opt = _trained_pair()
    (tmp_path / "checkpoints" / "step_000005.tmp").mkdir(parents=True)
    save_checkpoint(tmp_path, model, opt, TrainerState(step=10), keep_last=2)
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def test_a_checkpoint_of_another_shape_is_one_user_error(tmp_path):
    model, opt = _trained_pair()
    save_checkpoint(tmp_path, model, opt, TrainerState(step=1), keep_last=1)
    deeper = tiny_model("llama-tiny", n_layer=3)
    with pytest.raises(UserError, match=r"does not fit this model: missing \['blocks.2"):
        load_weights(deeper, latest_checkpoint(tmp_path))
