"""`lmforge app` end to end at toy size: build, baselines, fine-tune, evaluate, report."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from lmforge import rundir
from lmforge.apps.options import DEFAULT_BASE, AppRequest
from lmforge.config import DEFAULT_RECIPE, load_train_config, to_dict
from lmforge.errors import UserError
from lmforge.testhooks import FAKE_STEP_SECONDS
from tests.fixtures import HANG_S

TOY_APP_BASE = [f"base.{kv}" for kv in ("model.n_embd=32", "model.n_head=2", "model.block_size=48",
                                          "train.max_steps=3", "train.budget_minutes=null", "train.batch_size=2",
                                          "data.val_fraction=0.2", "train.eval_interval=3")]
"""``--set`` values that shrink the translation app's own base to a toy."""


def sets(*overrides: str) -> list[str]:
    return [arg for kv in overrides for arg in ("--set", kv)]


def lmforge(*args: str, cwd: Path | None = None, fault: str | None = None) -> subprocess.CompletedProcess:
    """The command, in ``cwd``; ``fault``: killed as by ``kill -9`` at that point (``LMFORGE_FAULT``)."""
    env = {k: v for k, v in os.environ.items() if k != "LMFORGE_FAULT"} | ({"LMFORGE_FAULT": fault} if fault else {})
    return subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, timeout=HANG_S,
                          cwd=cwd, env=env)


def test_translation_recipe_writes_the_report_with_model_and_baselines(catalogs, tmp_path, monkeypatch):
    out = tmp_path / "app"
    # A machine far too slow for the recipe: on the budget's fake clock (0.1 s a step) a 1.2 s budget plans 12 steps
    # at step 11, under 3x the recipe's 30-step warmup; the report says so.
    monkeypatch.setenv(FAKE_STEP_SECONDS, "0.1")
    done = lmforge("app", "translation", str(catalogs), "--out", str(out), "--test-fraction", "0.3",
                   *sets(*TOY_APP_BASE, "train.budget_minutes=0.02", "train.batch_size=4", "data.val_fraction=0.2"))
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    # its own base, pretrained on the training records' text (tokenizer included), then fine-tuned as seq2seq
    assert results["base"] == str(out / "base") and results["base_steps"] == 3
    base_cfg = load_train_config(out / "base" / "config.yaml")
    assert base_cfg.model.arch == "encoder_decoder" and base_cfg.data.sources == [str(out / "data" / "pretrain.jsonl")]
    assert results["finetune_steps"] == 12 and results["test_records"] >= 2
    assert results["too_short"].startswith("too short for this recipe: 12 steps, under 3x its 30-step warmup")
    report = (out / "report.md").read_text()
    assert f"**Warning**: the fine-tuning was {results['too_short']}" in report
    assert set(results["baselines"]) == {"copy the source", "nearest neighbour"}
    assert results["bar"]["value"] == max(b["chrf"] for b in results["baselines"].values())
    assert results["beats_bar"] == (results["model"]["chrf"] > results["bar"]["value"])
    for row in ("| model (beam4) |", "| model (greedy) |", "| copy the source |", "| nearest neighbour |",
                "| chrF by the memory's similarity |", "**Input**", "- reference:"):
        assert row in report
    assert "chrf" in done.stdout and "wrote" in done.stdout
    # the model was scored as `lmforge eval --generate TEST [--beams 4]` scores it, on every test record
    for name, label, beams in (("eval.json", "greedy", 1), ("eval-beam4.json", "beam4", 4)):
        gen = json.loads((out / name).read_text())["results"]["generate"]
        assert gen["examples"] == results["test_records"] and gen["settings"]["beams"] == beams
        assert gen["file"] == str(out / "data" / "test.jsonl")
        assert {k: gen[k] for k in results["model"]} == {k: results["searches"][label][k] for k in results["model"]}
    # the memory threshold: the one whose answers scored best on the dev records (held out of fine-tuning)
    memory = results["memory"]
    best = max(memory["dev"].values())
    chosen = 1.01 if memory["threshold"] is None else memory["threshold"]  # None: the model always
    assert memory["dev_records"] >= 1 and memory["dev"][f"{chosen:g}"] == best
    assert max(float(t) for t, v in memory["dev"].items() if v == best) == chosen
    main = "beam4" if memory["threshold"] is None else f"beam4 + memory ≥ {memory['threshold']:g}"
    assert results["search"] == main and results["model"]["chrf"] == results["searches"][main]["chrf"]
    assert set(results["breakdown"]) == {f"model ({s})" for s in results["searches"]} | set(results["baselines"])


def test_the_budget_is_shared_as_the_recipe_shares_it_and_base_keys_need_an_own_base():
    from lmforge.apps.recipe import APPS, budget_overrides, recipe_minutes

    pretrain, finetuning = recipe_minutes(APPS["translation"])
    assert pretrain > 0 and finetuning > 0
    base, fine = budget_overrides(APPS["translation"], AppRequest(name="translation", budget_minutes=2 * (
        pretrain + finetuning)))
    assert base == [f"train.budget_minutes={2 * pretrain:.4g}"]
    assert fine == [f"train.budget_minutes={2 * finetuning:.4g}"]
    # fine-tuning another base (--base): all of the budget is the fine-tuning's
    assert budget_overrides(APPS["qa"], AppRequest(name="qa", base="runs/x", budget_minutes=8)) == (
        [], ["train.budget_minutes=8"])
    assert budget_overrides(APPS["qa"], AppRequest(name="qa")) == ([], [])


@pytest.mark.parametrize("args, message", [
    (["qa", "--lang", "fr"], "--lang applies to translation"),
    (["translation", "/nonexistent.po"], "catalog '/nonexistent.po' does not exist"),
    (["summarization", "--set", "model.n_layer=2"], "cannot be set"),
    (["qa", "--base", "runs/x", "--set", "base.model.n_layer=2"],
     "sets the app's own base recipe, and qa fine-tunes --base runs/x"),
    (["translation", "--budget-minutes", "0"], "--budget-minutes: expected a positive number of minutes"),
])
def test_bad_requests_fail_in_one_line(args, message, tmp_path):
    done = lmforge("app", *args, "--out", str(tmp_path / "x"))
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "x").exists()  # refused before anything was written (the lock's folder removed again)


def test_every_app_has_a_shipped_recipe_that_loads():
    from lmforge.apps.recipe import APP_CONFIGS, APPS
    from lmforge.config import load_finetune_config

    assert sorted(p.stem for p in APP_CONFIGS.glob("*.yaml")) == sorted(APPS)
    assert sorted(p.stem for p in (APP_CONFIGS / "base").glob("*.yaml")) == sorted(
        name for name, app in APPS.items() if app.pretrain_text is not None)
    for name, app in APPS.items():
        cfg = load_finetune_config(APP_CONFIGS / f"{name}.yaml", ["base=runs/x", "data.train=t.jsonl"])
        assert cfg.task == "seq2seq" and cfg.data.response_field == "reference"
        assert cfg.train.budget_minutes
        if app.pretrain_text is not None:
            base = load_train_config(APP_CONFIGS / "base" / f"{name}.yaml", ["data.sources=[p.jsonl]"])
            assert base.model.arch == "encoder_decoder" and base.train.budget_minutes


def test_a_missing_default_base_is_trained_by_the_recipe_lmforge_train_runs_into_the_base_path(tmp_path, monkeypatch):
    from lmforge.apps import recipe

    calls = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(recipe, "train", lambda cfg, resume=False: calls.append((cfg, resume)))
    recipe.ensure_base(DEFAULT_BASE, say=lambda _: None)
    [(cfg, resume)] = calls
    assert to_dict(cfg) == to_dict(load_train_config(DEFAULT_RECIPE))  # cli's train, no -c and not resume
    assert Path(cfg.out_dir) == Path(DEFAULT_BASE)  # where the app looks for it next time


def test_an_app_folder_is_continued_only_with_the_settings_it_was_started_with(catalogs, tmp_path):
    from lmforge.apps.recipe import DATA_FILES, run_app

    out = tmp_path / "app"
    req = AppRequest(name="translation", sources=[str(catalogs)], test_fraction=0.3, out_dir=str(out), data_only=True)
    run_app(req, say=lambda _: None)
    written = [(out / "data" / name).stat().st_mtime_ns for name in DATA_FILES]
    said = []
    run_app(req, say=said.append)  # the same command: the records are reused, not written again
    assert [(out / "data" / name).stat().st_mtime_ns for name in DATA_FILES] == written
    assert any("built with these settings before" in line for line in said)
    with pytest.raises(UserError, match="other settings \\(split_seed 0 -> 1\\)"):
        run_app(dataclasses.replace(req, split_seed=1))
    refused = []

    def another_writer() -> None:
        try:
            run_app(req)
        except UserError as e:
            refused.append(str(e))

    with rundir.lock(out):  # held here: a second writer (a thread, as another process would be) is refused
        writer = threading.Thread(target=another_writer)
        writer.start()
        writer.join(HANG_S)
    assert refused and "is being written by" in refused[0]
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights.bin").write_bytes(b"")
    with pytest.raises(UserError, match="not the output folder of an `lmforge app` run"):
        run_app(dataclasses.replace(req, out_dir=str(tmp_path / "model")))
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["weights.bin"]


@pytest.mark.slow
def test_a_killed_app_continues_on_the_same_command_without_redoing_finished_stages(source_tree, tmp_path):
    app = ["app", "summarization", str(source_tree), "--out", "app", "--test-fraction", "0.3",
           *sets(*TOY_APP_BASE, "base.train.max_steps=4", "base.train.ckpt_interval=2", "train.max_steps=4",
                 "train.budget_minutes=null", "train.batch_size=4", "data.val_fraction=0.2", "train.ckpt_interval=2",
                 "train.precision=fp32")]
    # the app's own base dies in its step 3, after its checkpoint of step 2
    killed = lmforge(*app, cwd=tmp_path, fault="mid_step:3")
    assert killed.returncode == -9, killed.stderr[-2000:]
    build = tmp_path / "app" / "data" / "build.json"
    written = build.stat().st_mtime_ns
    # the base's steps 3-4 pass the fault point twice; the fine-tuning dies in its step 3 (after step 2's checkpoint)
    first = lmforge(*app, cwd=tmp_path, fault="mid_step:5")
    assert first.returncode == -9, first.stderr[-2000:]
    assert "base stopped before it finished: resuming it" in first.stdout and "(step 2)" in first.stdout
    metrics = (tmp_path / "app" / "base" / "metrics.jsonl").read_text()
    assert json.loads(metrics.splitlines()[-1]) | {"time_s": 0} == {"step": 4, "kind": "done", "time_s": 0}

    done = lmforge(*app, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "app" / "base" / "metrics.jsonl").read_text() == metrics  # finished: not trained again
    assert "built with these settings before" in done.stdout and build.stat().st_mtime_ns == written
    assert "model stopped before it finished: resuming" in done.stdout and "(step 2)" in done.stdout
    results = json.loads((tmp_path / "app" / "results.json").read_text())
    assert results["finetune_steps"] == 4 and results["base_steps"] == 4 and (tmp_path / "app" / "report.md").is_file()
    assert not list((tmp_path / "app").glob(".*tmp*"))

    again = lmforge(*app, cwd=tmp_path)  # finished: the same command reuses the model and its evaluation
    assert again.returncode == 0, again.stderr[-2000:]
    assert "finished fine-tuning before (step 4)" in again.stdout and "evaluated before" in again.stdout
    assert json.loads((tmp_path / "app" / "results.json").read_text())["model"] == results["model"]


def test_a_run_stopped_before_its_first_checkpoint_starts_again_and_a_finished_one_is_left_alone(tmp_path):
    from lmforge.apps.recipe import continue_or_start, training_finished

    run = tmp_path / "run"
    run.mkdir()
    rundir.write_run_info(run, "pretrain", "lm")
    (run / "config.yaml").write_text("out_dir: run\n")
    (run / "metrics.jsonl").write_text('{"step": 25, "kind": "train", "loss": 5.0}\n{"step": 50, "ki')  # torn by a kill
    (run / "checkpoints" / "step_000100.tmp").mkdir(parents=True)  # a checkpoint that was being written
    with rundir.lock(run):
        assert continue_or_start(run, training_finished, say=lambda _: None) is False
        assert [p.name for p in run.iterdir()] == [rundir.LOCK]  # nothing trained was there to lose
    rundir.write_run_info(run, "pretrain", "lm")
    (run / "metrics.jsonl").write_text('{"step": 50, "kind": "train", "loss": 5.0}\n{"step": 50, "kind": "done"}\n')
    assert continue_or_start(run, training_finished) is None
    (run / "metrics.jsonl").write_text('{"step": 50, "kind": "train", "loss": 5.0}\n')
    (run / "checkpoints" / "step_000050").mkdir(parents=True)  # a checkpoint, not a valid one: not thrown away
    with pytest.raises(UserError, match="cannot continue"):
        continue_or_start(run, training_finished)
