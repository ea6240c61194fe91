"""One plan per run: train() never modifies the config it is given; the run's config.yaml holds what it derived."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import yaml

from lmforge.config import load_train_config
from lmforge.training.pretrain import train

TINY = ["model.preset=gpt2-tiny", "model.n_layer=1", "model.block_size=32", "train.batch_size=4",
        "train.max_steps=2", "train.eval_interval=2", "train.eval_batches=1", "sample.num_samples=0",
        "train.precision=fp32", "data.tokenizer=char"]


def test_train_leaves_its_config_as_given_and_writes_what_it_derived(tmp_path):
    src = tmp_path / "corpus.txt"
    src.write_text(Path(copy.__file__).read_text())
    asked = tmp_path / "run"
    asked.mkdir()
    (asked / "config.yaml").write_text("{}\n")  # an existing run there: this one goes to a numbered sibling
    cfg = load_train_config(None, [*TINY, f"data.sources=[{src}]", f"out_dir={asked}",
                                   "train.global_batch_size=8"])  # 2 micro-batches of 4
    before = copy.deepcopy(cfg)
    result = train(cfg, progress=False)
    assert cfg == before
    assert result.run_dir != asked
    saved = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert saved["out_dir"] == str(result.run_dir)
    assert saved["data"]["dataset_dir"] == str(result.run_dir / "data")
    assert saved["model"]["vocab_size"] > 0 and cfg.model.vocab_size == 0
    assert saved["train"]["grad_accum"] == 2 and cfg.train.grad_accum == 1
    # A resume from that config.yaml is the same plan: nothing in it is derived again differently.
    resumed = load_train_config(result.run_dir / "config.yaml", ["train.max_steps=3"])
    before = copy.deepcopy(resumed)
    train(resumed, resume=True, progress=False)
    assert resumed == before


def test_a_resumed_run_keeps_the_precision_it_trained_in(dataset, tmp_path, monkeypatch):
    from lmforge.training import precision

    def measured(bf16_s: float):  # what measuring the model's step would say now, without timing anything
        return lambda cfg, device: {"fp32_s": 1.0, "bf16_s": bf16_s, "bf16_gemm": 2.0, "loss_gap": 0.0}

    monkeypatch.setattr(precision, "cached", lambda device, key, measure: measure())
    monkeypatch.setattr(precision, "measure_precisions", measured(0.5))  # bf16 twice as fast: bf16
    overrides = [o for o in TINY if not o.startswith(("train.precision", "data."))]
    out = tmp_path / "run"
    train(load_train_config(None, [*overrides, f"data.dataset_dir={dataset}", f"out_dir={out}",
                                   "train.precision=auto"]), progress=False)
    assert json.loads((out / "checkpoints" / "step_000002" / "trainer.json").read_text())["precision"] == "bf16"
    monkeypatch.setattr(precision, "measure_precisions", measured(2.0))  # now bf16 measures slower
    train(load_train_config(out / "config.yaml", ["train.max_steps=3"]), resume=True, progress=False)
    assert json.loads((out / "checkpoints" / "step_000003" / "trainer.json").read_text())["precision"] == "bf16"
