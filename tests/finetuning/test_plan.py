"""One plan per run: finetune() never modifies the config it is given; config.yaml holds what it derived."""

from __future__ import annotations

import copy

import yaml

from lmforge.config import load_finetune_config
from lmforge.finetuning.finetune import finetune


def test_finetune_leaves_its_config_as_given_and_writes_what_it_derived(base_run, repeat_task, tmp_path,
                                                                       monkeypatch):
    train_file, val_file = repeat_task
    monkeypatch.chdir(base_run.parent)  # a relative base: the plan resolves it, the config keeps it as given
    cfg = load_finetune_config(None, [f"base={base_run.name}", f"data.train={train_file}", f"data.val={val_file}",
                                      f"out_dir={tmp_path / 'ft'}", "train.max_steps=2", "train.eval_interval=2",
                                      "train.batch_size=4", "data.eval_generations=0", "train.precision=fp32"])
    before = copy.deepcopy(cfg)
    result = finetune(cfg, progress=False)
    assert cfg == before
    saved = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert saved["base"] == str(base_run.resolve()) and cfg.base == base_run.name
    base_model = yaml.safe_load((base_run / "config.yaml").read_text())["model"]
    assert saved["model"] == base_model
