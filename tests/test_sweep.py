"""`lmforge sweep`: a killed sweep restarts to the same trials an uninterrupted one runs, bad sweep files are
refused in one line, failed trials are recorded with their reason and the sweep goes on, a locked study.db
delays a heartbeat with a warning, and optim.l1 shrinks the weights."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml

from lmforge import sweep
from lmforge.cli import main
from lmforge.config import DataConfig, load_train_config
from lmforge.data.prepare import prepare
from lmforge.loading import load_run
from lmforge.sweep import make_storage, run_sweep, trial_dir
from lmforge.training.pretrain import train
from tests.fixtures import HANG_S


def _sweep_file(tmp_path: Path, corpus: Path, **changes) -> Path:
    spec = {
        "base": "shakespeare-char",
        "overrides": [f"data.sources=[{corpus}]", "model.n_layer=1", "model.n_embd=32", "model.n_head=2",
                      "model.block_size=32", "train.batch_size=8", "train.max_steps=30", "train.eval_interval=10",
                      "train.eval_batches=2", "train.log_interval=10", "train.ckpt_interval=10",
                      "train.device=cpu", "train.precision=fp32", "optim.warmup_steps=0"],
        "trials": 5, "seed": 3, "startup_trials": 2, "heartbeat_s": 1,
        "space": {"optim.lr": {"type": "float", "low": 1e-4, "high": 3e-2, "log": True},
                  "optim.weight_decay": {"type": "float", "low": 0.0, "high": 0.2}},
        **changes,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text(Path(json.__file__).read_text()[:60000])
    return path


def _finished(study) -> list[tuple[dict, float | None, str]]:
    return [(t.params, t.value, t.state.name) for t in study.get_trials() if t.state.name in ("COMPLETE", "PRUNED")]


@pytest.mark.slow  # ~30 s: two sweeps, one of them in a process killed and started again
def test_a_sweep_killed_mid_trial_restarts_to_the_same_trials_and_resumes_that_trial(tmp_path, corpus):
    reference = run_sweep(str(_sweep_file(tmp_path, corpus)), out_dir=str(tmp_path / "ref"), say=lambda *a, **k: None)

    # The same sweep in a process SIGKILLed once trial 2 has a checkpoint, then started again.
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "lmforge", "sweep", "-c", str(_sweep_file(tmp_path, corpus)), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    latest = trial_dir(out, 2) / "checkpoints" / "latest"
    deadline = time.monotonic() + HANG_S
    while not latest.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert latest.exists(), "trial 2 never wrote a checkpoint"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = (trial_dir(out, 2) / "checkpoints" / "latest").read_text().strip()
    restarted = run_sweep(str(_sweep_file(tmp_path, corpus)), out_dir=str(out), say=lambda *a, **k: None)

    assert _finished(restarted) == _finished(reference)
    states = [t.state.name for t in restarted.get_trials()]
    assert states.count("FAIL") == 1 and len(states) == len(reference.get_trials()) + 1
    # Every finished trial trained once, in its own directory: the retry resumed trial 2's from its checkpoint.
    finished = [t for t in restarted.get_trials() if t.state.name in ("COMPLETE", "PRUNED")]
    dirs = {Path(t.user_attrs["run_dir"]) for t in finished}
    assert len(dirs) == len(finished) and dirs == set((out / "trials").iterdir()) and trial_dir(out, 2) in dirs
    for d in dirs:
        records = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        assert sum(r["kind"] == "done" for r in records) == 1
    assert killed_at != "step_000000" and (out / "best.yaml").is_file() and (out / "history.png").is_file()


def test_bad_sweep_files_are_refused_in_one_line_and_touch_no_study(tmp_path, corpus, capsys):
    cases = [
        ({"space": {"optim.lrr": {"type": "float", "low": 1e-4, "high": 1e-2}}}, "optim.lrr"),
        ({"space": {"optim.lr": {"type": "float", "low": 1e-2, "high": 1e-4}}}, "empty range"),
        ({"space": {"optim.lr": {"type": "float", "low": 0.0, "high": 1e-2, "log": True}}}, "log range"),
        ({"space": {"model.n_layer": {"type": "categorical", "choices": []}}}, "non-empty list"),
        ({"metric": "accuracy"}, "metric 'accuracy'"),
        ({"pruner": "sometimes"}, "pruner 'sometimes'"),
    ]
    for changes, expected in cases:
        path = _sweep_file(tmp_path, corpus, **changes)
        assert main(["sweep", "-c", str(path), "--out", str(tmp_path / "sw")]) == 2
        err = capsys.readouterr().err.strip()
        assert expected in err and "\n" not in err, err
        assert not (tmp_path / "sw").exists()
    path = _sweep_file(tmp_path, corpus)
    assert main(["sweep", "-c", str(path), "--out", str(tmp_path / "sw2"), "--storage", "nosuchdb://x"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--storage nosuchdb://x" in err and "\n" not in err and not (tmp_path / "sw2").exists()


def _trials(sweep_dir: Path) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name="sweep", storage=f"sqlite:///{sweep_dir / 'study.db'}").get_trials()


@pytest.mark.slow  # ~5 s: two trials (the test below runs one trial through the same failure path by default)
def test_a_sweep_whose_every_trial_diverges_records_each_failure_and_ends_in_one_line(tmp_path, corpus, capfd):
    path = _sweep_file(tmp_path, corpus, trials=2, space={"optim.lr": {"type": "float", "low": 1e5, "high": 1e6}})
    assert main(["sweep", "-c", str(path), "--out", str(tmp_path / "sw")]) == 3
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err
    assert err.strip().splitlines()[-1].startswith("lmforge sweep: halted: no trial of the sweep succeeded: 2 failed")
    trials = _trials(tmp_path / "sw")
    assert [t.state.name for t in trials] == ["FAIL", "FAIL"]
    assert all("try a lower optim.lr" in t.user_attrs["fail_reason"] for t in trials)
    assert trials[0].params != trials[1].params  # a failed trial does not make the next one draw the same
    assert out.count("  failed: ") == 2


def test_a_block_size_longer_than_the_data_stops_the_sweep_at_its_first_trial_in_one_line(tmp_path, corpus, capfd):
    path = _sweep_file(tmp_path, corpus)
    spec = yaml.safe_load(path.read_text())
    spec["overrides"].append("model.block_size=100000")
    path.write_text(yaml.safe_dump(spec))
    assert main(["sweep", "-c", str(path), "--out", str(tmp_path / "sw")]) == 2
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err
    assert err.strip().splitlines()[-1].startswith("lmforge sweep: error: trial 0: ")
    assert "fewer than one block of 100000" in err and "no further trial" in err
    trial, = _trials(tmp_path / "sw")
    assert trial.state.name == "FAIL" and "fewer than one block" in trial.user_attrs["fail_reason"]
    assert main(["sweep", "--report", str(tmp_path / "sw")]) == 0  # a later report says why it failed
    row = capfd.readouterr().out.splitlines()[1]
    assert row.startswith("0 ") and "fail" in row and "| failed: " in row and "fewer than one block" in row


def test_a_missing_input_file_is_refused_before_any_trial_in_one_line_naming_file_and_key(tmp_path, corpus, capfd,
                                                                                        monkeypatch):
    # The README's sweep run from a folder without the text its base reads: no trial may be recorded for it.
    monkeypatch.chdir(tmp_path)
    fixed = _sweep_file(tmp_path, corpus, base="shakespeare-fast")
    spec = yaml.safe_load(fixed.read_text())
    spec["overrides"] = [o for o in spec["overrides"] if not o.startswith("data.sources")]
    fixed.write_text(yaml.safe_dump(spec))
    (tmp_path / "searched").mkdir()
    searched = _sweep_file(tmp_path / "searched", corpus,
                           space={"data.sources": {"type": "categorical", "choices": [[str(corpus)], ["nowhere.txt"]]}})
    (tmp_path / "prepared").mkdir()
    prepared = _sweep_file(tmp_path / "prepared", corpus, overrides=["data.dataset_dir=data/chars"])
    (tmp_path / "runs" / "base").mkdir(parents=True)
    finetune = {"command": "finetune", "base": None, "metric": "val_loss",
                "space": {"optim.lr": {"type": "float", "low": 1e-4, "high": 3e-3, "log": True}}}
    (tmp_path / "no_base.yaml").write_text(yaml.safe_dump(
        {**finetune, "overrides": ["task=sft", "base=runs/gone", "data.train=chat.jsonl"]}))
    (tmp_path / "no_examples.yaml").write_text(yaml.safe_dump(
        {**finetune, "overrides": ["task=sft", "base=runs/base", "data.train=chat.jsonl"]}))
    for path, expected in ((fixed, "data.sources: data source 'tinyshakespeare.txt' does not exist"),
                           (searched, "data.sources: data source 'nowhere.txt' does not exist"),
                           (prepared, "data.dataset_dir: dataset folder 'data/chars' does not exist"),
                           (tmp_path / "no_base.yaml", "base: 'runs/gone' does not exist"),
                           (tmp_path / "no_examples.yaml", "data.train: 'chat.jsonl' does not exist")):
        assert main(["sweep", "-c", str(path), "--out", str(tmp_path / "sw")]) == 2
        out, err = capfd.readouterr()
        assert expected in err and f"working folder, {Path.cwd()})" in err
        assert "\n" not in err.strip() and "trial" not in out
        assert not (tmp_path / "sw").exists()


def test_a_config_a_trial_draws_that_is_invalid_fails_that_trial_in_one_line(tmp_path, corpus, capfd):
    # n_head=3 does not divide n_embd=32; the range's ends (1 and 4) do, so only a trial finds out.
    path = _sweep_file(tmp_path, corpus, seed=0, space={"model.n_head": {"type": "int", "low": 1, "high": 4}})
    assert main(["sweep", "-c", str(path), "--out", str(tmp_path / "sw")]) == 2
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err and "model.n_head=3" in out
    assert err.strip().splitlines() == [err.strip()] and "trial 0: " in err and "n_head" in err
    trial, = _trials(tmp_path / "sw")
    assert trial.state.name == "FAIL" and "n_head" in trial.user_attrs["fail_reason"]


def test_a_block_size_longer_than_a_shared_prepared_dataset_is_refused_before_the_study(tmp_path, corpus, capsys):
    prepare(DataConfig(sources=[str(corpus)], tokenizer="char"), tmp_path / "data", progress=False)
    for space_key in ({}, {"model.block_size": {"type": "categorical", "choices": [32, 100000]}}):
        path = _sweep_file(tmp_path, corpus)
        spec = yaml.safe_load(path.read_text())
        spec["overrides"] = [o for o in spec["overrides"] if not o.startswith("data.sources")]
        spec["overrides"].append(f"data.dataset_dir={tmp_path / 'data'}")
        spec["overrides"] += [] if space_key else ["model.block_size=100000"]
        spec["space"].update(space_key)
        path.write_text(yaml.safe_dump(spec))
        assert main(["sweep", "-c", str(path), "--out", str(tmp_path / "sw")]) == 2
        err = capsys.readouterr().err.strip()
        assert "fewer than one block of 100000" in err and "\n" not in err, err
        assert not (tmp_path / "sw").exists()


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # Optuna's note on asking a trial outside optimize()
def test_a_locked_study_db_delays_the_heartbeat_with_one_warning_and_never_raises(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "SQLITE_BUSY_S", 0.05)
    db = tmp_path / "study.db"
    storage = make_storage(f"sqlite:///{db}", heartbeat_s=1)
    trial = optuna.create_study(storage=storage).ask()
    holder = sqlite3.connect(db)
    holder.execute("BEGIN EXCLUSIVE")  # another process in the middle of a write transaction
    with pytest.warns(UserWarning, match="heartbeat was not written.*database is locked") as caught:
        storage.record_heartbeat(trial._trial_id)
        storage.record_heartbeat(trial._trial_id)
    assert len(caught) == 1
    holder.rollback()
    storage.record_heartbeat(trial._trial_id)  # written again once the lock is gone
    assert not storage._get_stale_trial_ids(trial.study._study_id)


def test_l1_shrinks_the_sum_of_absolute_weights(tmp_path, corpus):
    sums = {}
    for l1 in (0.0, 1e-3):
        cfg = load_train_config("shakespeare-char", [
            f"data.sources=[{corpus}]", "model.n_layer=1", "model.n_embd=32", "model.n_head=2",
            "model.block_size=32", "train.batch_size=8", "train.max_steps=40", "train.eval_interval=40",
            "train.eval_batches=1", "train.log_interval=20", "train.device=cpu", "train.precision=fp32",
            "optim.warmup_steps=0", "optim.weight_decay=0.0", f"optim.l1={l1}", f"out_dir={tmp_path / str(l1)}",
            "sample.num_samples=0"])
        train(cfg, progress=False)
        model = load_run(tmp_path / str(l1)).model
        sums[l1] = sum(p.abs().sum().item() for p in model.parameters() if p.dim() >= 2)
        records = [json.loads(x) for x in (tmp_path / str(l1) / "metrics.jsonl").read_text().splitlines()]
        assert any("l1_penalty" in r for r in records) == (l1 > 0)
    assert sums[1e-3] < 0.9 * sums[0.0]
    assert torch.isfinite(torch.tensor(list(sums.values()))).all()


def _contrast(a, b) -> float:
    """WCAG's contrast ratio of two RGB(A) colours (1: the same luminance, 21: black on white)."""
    def luminance(c) -> float:
        lin = [x / 12.92 if x <= 0.04045 else ((x + 0.055) / 1.055) ** 2.4 for x in c[:3]]
        return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]
    high, low = sorted((luminance(a), luminance(b)), reverse=True)
    return (high + 0.05) / (low + 0.05)


def test_parallel_png_draws_every_trial_in_a_colour_that_stands_out_from_its_background():
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection

    for direction in ("minimize", "maximize"):
        study = optuna.create_study(direction=direction, sampler=optuna.samplers.RandomSampler(seed=0))
        study.optimize(lambda t: t.suggest_float("optim.lr", 1e-4, 1e-2, log=True) * 100 + t.suggest_int("n", 1, 4),
                       n_trials=8)
        ax = sweep.parallel_plot(study)
        lines, = [c for c in ax.collections if isinstance(c, LineCollection)]
        colours = lines.to_rgba(lines.get_array())  # what each trial's line is drawn in
        assert len(colours) == 8
        assert min(_contrast(c, ax.get_facecolor()) for c in colours) >= 2.0
        plt.close(ax.get_figure())
