"""`lmforge app` end to end at toy size: build, baselines, fine-tune, evaluate, report."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lmforge.config import load_train_config
from lmforge.training.pretrain import train
from tests.fixtures import HANG_S

TOY_BASE = ["data.tokenizer=char", "model.preset=gpt2-tiny", "model.n_layer=1", "model.n_embd=32", "model.n_head=2",
            "model.block_size=256", "train.batch_size=4", "train.max_steps=3", "train.eval_interval=3",
            "train.eval_batches=1", "sample.num_samples=0"]


@pytest.fixture(scope="module")
def toy_base(tmp_path_factory):
    import argparse

    folder = tmp_path_factory.mktemp("base")
    train(load_train_config(None, [f"data.sources=[{argparse.__file__}]", f"out_dir={folder / 'run'}", *TOY_BASE]),
          progress=False)
    return folder / "run"


def lmforge(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, timeout=HANG_S)


def test_translation_recipe_writes_the_report_with_model_and_baselines(catalogs, toy_base, tmp_path):
    out = tmp_path / "app"
    done = lmforge("app", "translation", str(catalogs), "--base", str(toy_base), "--out", str(out),
                   "--test-fraction", "0.3", "--set", "train.max_steps=4", "--set", "train.budget_minutes=null",
                   "--set", "train.batch_size=4", "--set", "data.val_fraction=0.2")
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert results["finetune_steps"] == 4 and results["test_records"] >= 2
    assert set(results["baselines"]) == {"copy the source", "nearest neighbour"}
    assert results["bar"]["value"] == max(b["chrf"] for b in results["baselines"].values())
    assert results["beats_bar"] == (results["model"]["chrf"] > results["bar"]["value"])
    report = (out / "report.md").read_text()
    for row in ("| model |", "| copy the source |", "| nearest neighbour |", "**Input**", "- reference:"):
        assert row in report
    assert "chrf" in done.stdout and "wrote" in done.stdout
    # the model was scored as `lmforge eval --generate TEST --chat` scores it, on every test record
    gen = json.loads((out / "eval.json").read_text())["results"]["generate"]
    assert gen["settings"]["chat"] and gen["examples"] == results["test_records"]
    assert gen["file"] == str(out / "data" / "test.jsonl")
    assert {k: gen[k] for k in results["model"]} == results["model"]


@pytest.mark.parametrize("args, message", [
    (["qa", "--lang", "fr"], "--lang applies to translation"),
    (["translation", "/nonexistent.po"], "catalog '/nonexistent.po' does not exist"),
    (["summarization", "--set", "model.n_layer=2"], "cannot be set"),
])
def test_bad_requests_fail_in_one_line(args, message, tmp_path):
    done = lmforge("app", *args, "--out", str(tmp_path / "x"))
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


def test_every_app_has_a_shipped_recipe_that_loads():
    from lmforge.apps.recipe import APP_CONFIGS, APPS
    from lmforge.config import load_finetune_config

    assert sorted(p.stem for p in APP_CONFIGS.glob("*.yaml")) == sorted(APPS)
    for name in APPS:
        cfg = load_finetune_config(APP_CONFIGS / f"{name}.yaml", ["base=runs/x", "data.train=t.jsonl"])
        assert cfg.task == "sft" and cfg.data.response_field == "reference" and cfg.train.budget_minutes
