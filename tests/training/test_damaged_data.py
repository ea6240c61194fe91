"""A prepared dataset damaged after `prepare` (a shard cut short, meta.json of another shape, a token
id outside the vocabulary): training says so in one UserError naming the file, and a damaged shard or
meta.json is found before any run directory is created."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from lmforge.config import load_train_config
from lmforge.errors import UserError
from lmforge.training.pretrain import train

ARGS = ["model.preset=gpt2-tiny", "model.n_layer=1", "model.block_size=32", "train.batch_size=4",
        "train.max_steps=3", "train.eval_batches=1", "sample.num_samples=0"]


def _damaged(dataset, tmp_path, damage):
    copy = tmp_path / "ds"
    shutil.copytree(dataset, copy)
    damage(copy)
    return copy


def _cut(name: str, n_bytes: int):
    def cut(ds):
        data = (ds / name).read_bytes()
        (ds / name).write_bytes(data[:len(data) - n_bytes])
    return cut


def _meta_without_dtype(ds):
    meta = json.loads((ds / "meta.json").read_text())
    del meta["dtype"]
    (ds / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(("damage", "message"), [
    (_cut("train.bin", 1), "train.bin' has .* bytes, expected 37855 uint16 tokens"),
    (_cut("val.bin", 200), "val.bin' has .* bytes, expected 4207 uint16 tokens"),
    (_meta_without_dtype, "meta.json' is damaged: it needs 'dtype'")])
def test_a_damaged_dataset_is_one_error_before_any_run_directory_exists(dataset, tmp_path, damage, message):
    ds = _damaged(dataset, tmp_path, damage)
    cfg = load_train_config(None, [f"data.dataset_dir={ds}", f"out_dir={tmp_path / 'run'}", *ARGS])
    with pytest.raises(UserError, match=message):
        train(cfg, progress=False)
    assert not (tmp_path / "run").exists()


def test_a_token_id_outside_the_vocabulary_stops_training_with_one_error(dataset, tmp_path):
    def foreign_tokens(ds):
        tokens = np.fromfile(ds / "train.bin", dtype=np.uint16)
        tokens[::50] = 60000
        tokens.tofile(ds / "train.bin")
    ds = _damaged(dataset, tmp_path, foreign_tokens)
    cfg = load_train_config(None, [f"data.dataset_dir={ds}", f"out_dir={tmp_path / 'run'}", *ARGS])
    with pytest.raises(UserError, match="train.bin' holds token id 60000 at token .*, outside the model's vocabulary"):
        train(cfg, progress=False)
