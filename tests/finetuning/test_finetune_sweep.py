"""`lmforge sweep` over fine-tuning runs: a classification metric maximized, the trials ordinary finetune runs."""

from __future__ import annotations

import json

import yaml

from lmforge.cli import main
from lmforge.sweep import run_sweep


def test_a_finetune_sweep_maximizes_a_classification_metric(tmp_path, base_run, module_snippets, capsys):
    spec = {"command": "finetune", "base": None, "metric": "val_accuracy", "direction": "maximize", "trials": 2,
            "seed": 0, "pruner": "none", "heartbeat_s": 1,
            "overrides": ["task=classify", f"base={base_run}", f"data.train={module_snippets}", "train.max_steps=20",
                          "train.eval_interval=10", "train.batch_size=16", "train.device=cpu", "train.precision=fp32"],
            "space": {"optim.lr": {"type": "float", "low": 1e-4, "high": 3e-3, "log": True}}}
    path = tmp_path / "ft.yaml"
    path.write_text(yaml.safe_dump(spec))
    study = run_sweep(str(path), out_dir=str(tmp_path / "sw"), say=lambda *a, **k: None)
    done = [t for t in study.get_trials() if t.state.name == "COMPLETE"]
    assert len(done) == 2 and study.best_value == max(t.value for t in done)
    for t in done:  # the value is the run's own final evaluation
        final = json.loads((tmp_path / "sw" / "trials" / f"trial_{t.number:04d}" / "final_eval.json").read_text())
        assert final["val_accuracy"] == t.value
    # A metric this task does not report is refused before any trial.
    path.write_text(yaml.safe_dump({**spec, "metric": "exact_match"}))
    assert main(["sweep", "-c", str(path), "--out", str(tmp_path / "other")]) == 2
    assert "metric 'exact_match' is not one classify trials report" in capsys.readouterr().err
