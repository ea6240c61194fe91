from pathlib import Path

import pytest

from lmforge.config import RECIPES_DIR as PACKAGED_CONFIGS
from lmforge.config import TrainConfig, load_train_config, merge_overrides
from lmforge.errors import UserError


def test_defaults_then_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  preset: gpt2-small\n  n_layer: 3\ntrain:\n  max_steps: 10\n")
    cfg = load_train_config(p, ["train.max_steps=20", "optim.lr=3e-4", "data.sources=[a.txt, b.txt]"])
    assert cfg.model.n_layer == 3 and cfg.model.n_embd == 384  # explicit key beats the preset
    assert cfg.train.max_steps == 20 and cfg.optim.lr == 3e-4
    assert cfg.data.sources == ["a.txt", "b.txt"]
    assert cfg.train.batch_size == TrainConfig().train.batch_size


@pytest.mark.parametrize("override, message", [
    ("train.max_stepz=3", "unknown config key 'train.max_stepz'"),
    ("train.max_steps=abc", "config key 'train.max_steps': expected an integer, got 'abc'"),
    ("train.compile=maybe", "config key 'train.compile': expected true or false"),
    ("train.precision=fp8", "config key 'train.precision': expected one of"),
    ("model.preset=gpt9", "unknown model preset 'gpt9'"),
    ("train=3", "config section 'train': expected a mapping"),
    ("nonsense", "expected key=value"),
    ("model.n_head=5", "n_embd=128 must be divisible by model.n_head=5"),
])
def test_bad_keys_and_types_name_the_key(override, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        load_train_config(PACKAGED_CONFIGS / "shakespeare-char.yaml", [override])


def test_none_and_floats_parse():
    cfg = load_train_config(None, ["train.patience=null", "train.max_minutes=1.5", "optim.decay_steps=none"])
    assert cfg.train.patience is None and cfg.train.max_minutes == 1.5 and cfg.optim.decay_steps is None


def test_missing_and_invalid_yaml_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_train_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_train_config(bad)


def test_overrides_do_not_mutate_input():
    data = {"train": {"max_steps": 1}}
    merge_overrides(data, ["train.max_steps=2"])
    assert data == {"train": {"max_steps": 1}}


@pytest.mark.parametrize("path", sorted(PACKAGED_CONFIGS.glob("*.yaml")), ids=lambda p: Path(p).stem)
def test_every_shipped_recipe_loads(path):
    cfg = load_train_config(path)
    assert cfg.train.max_steps > 0
