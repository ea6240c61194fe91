"""``lmforge sweep``: hyper-parameter search on Optuna, each trial an ordinary lmforge training run.

A sweep file (YAML) names the base recipe, the overrides every trial gets (its budget: ``train.max_steps=300``),
the search space over any config keys, the metric and its direction::

    base: shakespeare-fast
    overrides: [train.max_steps=300, train.eval_interval=50]
    metric: val_loss            # val_loss | val_bpb | val_ppl (finetune: exact_match, val_accuracy, val_macro_f1)
    direction: minimize
    trials: 20
    seed: 0
    pruner: median              # median | hyperband | asha | none
    space:
      optim.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
      optim.warmup_steps: {type: int, low: 0, high: 100}
      model.n_layer: {type: categorical, choices: [2, 4, 6]}

Each trial trains in ``SWEEP_DIR/trials/trial_NNNN`` through the same loop as ``lmforge train`` (checkpoints,
metrics.jsonl, TensorBoard), reporting every evaluation to Optuna; the pruner stops poor trials there.

Crash safety. The study lives in SQLite in the sweep directory (Optuna's RDB storage) with a heartbeat: a sweep
killed mid-trial and started again marks that trial failed once its heartbeat is stale, and Optuna's
``RetryHeartbeatStaleTrialCallback`` queues it again with the same parameters and intermediate values; the retry
trains on in the failed trial's own run directory from its last checkpoint (resume is exact). A trial stopped
by Ctrl-C is queued again the same way at the next start. The sampler is TPE seeded per trial with ``seed`` + the
number of trials finished (or failed on their own) so far, so a sweep that was killed and restarted draws the same
parameters, in the same order, as one that never was: its (parameters, value) list is the same. ``trials`` counts
finished trials (complete or pruned): a finished study continues with ``--trials`` larger.

Failures. The files every trial reads (data sources or a prepared dataset; a fine-tuning base and its examples)
are checked before the study is touched: a missing one is one line naming it and its key. A trial that diverges
(:class:`TrainingHalted`) or whose config its parameters make invalid (a :class:`UserError`) is recorded FAIL with
its reason (the user attribute ``fail_reason``), printed in one line, and the sweep goes on; a failed trial uses
up its place, so a run starts at most ``trials`` minus the finished ones. A user mistake before any trial has
finished stops the sweep at once (it is in the fixed config: every trial would fail the same way); a sweep in
which no trial completed ends with one line and a non-zero exit.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from lmforge import rundir
from lmforge.config import load_finetune_config, load_train_config
from lmforge.data.loader import open_split
from lmforge.data.prepare import load_meta
from lmforge.data.sources import expand_sources
from lmforge.errors import TrainingHalted, TrainingInterrupted, UserError
from lmforge.finetuning.finetune import finetune
from lmforge.options import SweepOptions
from lmforge.training.pretrain import train

METRICS = {"train": ("val_loss", "val_bpb", "val_ppl"),
           "encoder train": ("val_loss", "val_ppl", "val_mlm_accuracy"),
           "encoder-decoder train": ("val_loss", "val_ppl", "val_reconstruction_accuracy"),
           "sft": ("val_loss", "val_ppl", "exact_match"),
           "classify": ("val_loss", "val_accuracy", "val_macro_f1", "val_macro_precision", "val_macro_recall"),
           "token_classify": ("val_loss", "val_accuracy", "val_macro_f1", "val_macro_precision", "val_macro_recall"),
           "seq2seq": ("val_loss", "val_ppl")}
"""What each kind of trial reports: pretraining (a decoder's, an encoder's, an encoder-decoder's), and fine-tuning per
task (exact_match only at the end)."""
DECODER_ONLY_KEYS = ("sample.max_new_tokens", "sample.prompt", "sample.temperature", "sample.top_k")
"""Keys that change only what a decoder writes (its samples): an encoder's trials would all be the same, and so would
an encoder-decoder's (its samples are greedy reconstructions of validation windows)."""
PRETRAINING_KINDS = {"decoder": "train", "encoder": "encoder train", "encoder_decoder": "encoder-decoder train"}
"""The kind of a pretraining trial (its METRICS), by model.arch."""
WRITES_NO_SAMPLES = {"encoder": "writes nothing",
                     "encoder_decoder": "writes greedy reconstructions of validation windows as its samples"}
"""Why DECODER_ONLY_KEYS change nothing for an architecture other than the decoder."""
PRUNERS = ("median", "hyperband", "asha", "none")
TYPES = ("float", "int", "categorical")
STUDY_DB = "study.db"
SQLITE_BUSY_S = 30.0
"""How long a call on an SQLite study waits for another process's write lock before it fails."""
TRIAL_FAILURES = (TrainingHalted, UserError)
"""What fails one trial and not the sweep: a diverged run, or a config that trial's parameters make invalid."""


@dataclass
class Param:
    """One dimension of the search space."""

    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None

    def values(self) -> list[Any]:
        """The extremes (or every choice): what the config must accept."""
        return list(self.choices) if self.type == "categorical" else [self.low, self.high]


@dataclass
class SweepConfig:
    command: str = "train"
    """What each trial runs: 'train' (pretraining) or 'finetune'."""
    base: str | None = "default"
    """The recipe (shipped name or YAML path) every trial starts from: a train or a finetune config; null: the
    defaults in code (a finetune sweep then sets base=..., data.train=... in overrides)."""
    overrides: list[str] = field(default_factory=list)
    """Dotted overrides every trial gets (its budget: train.max_steps=..., train.budget_minutes=...)."""
    space: dict[str, Param] = field(default_factory=dict)
    metric: str = "val_loss"
    direction: str = "minimize"
    trials: int = 20
    seed: int = 0
    pruner: str = "median"
    startup_trials: int = 5
    """Trials the pruner (and TPE) wait for before they act."""
    warmup_steps: int = 0
    """Steps of each trial before the pruner may stop it."""
    heartbeat_s: int = 30
    """How often a running trial's heartbeat is written; stale after twice that (a killed sweep's trial)."""


def _problem(path: str, text: str) -> UserError:
    return UserError(f"sweep file '{path}': {text}")


def load_sweep(path: str) -> SweepConfig:
    """The sweep file, checked: every space key is tried in the base config at its extremes (an unknown key or a
    value the config refuses is named), ranges are non-empty, the metric is one training reports."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"cannot read sweep file '{path}': {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise _problem(path, "expected a mapping of keys (base, overrides, space, metric, ...)")
    known = set(SweepConfig.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise _problem(path, f"unknown key '{unknown[0]}' (expected: {', '.join(sorted(known))})")
    space = data.pop("space", None)
    if not isinstance(space, dict) or not space:
        raise _problem(path, "'space' must map config keys to ranges, e.g. optim.lr: {type: float, low: 1e-4, "
                             "high: 1e-2, log: true}")
    cfg = SweepConfig(**data, space={key: _param(path, key, spec) for key, spec in space.items()})
    if cfg.command not in ("train", "finetune"):
        raise _problem(path, f"command '{cfg.command}': expected train or finetune")
    fixed = trial_config(cfg, [])
    if cfg.command == "finetune":
        kind = fixed.task
    else:
        arch = fixed.model.arch
        kind = PRETRAINING_KINDS[arch]
        decoder_only = [key for key in cfg.space if key in DECODER_ONLY_KEYS]
        if arch in WRITES_NO_SAMPLES and decoder_only:
            raise _problem(path, f"space key '{decoder_only[0]}' changes what a decoder writes; these trials train "
                                 f"an {arch.replace('_', '-')} (model.arch={arch}), which {WRITES_NO_SAMPLES[arch]}, "
                                 f"so every trial would be the same")
    if cfg.metric not in METRICS[kind]:
        raise _problem(path, f"metric '{cfg.metric}' is not one {kind} trials report "
                             f"(expected: {', '.join(METRICS[kind])})")
    if cfg.direction not in ("minimize", "maximize"):
        raise _problem(path, f"direction '{cfg.direction}': expected minimize or maximize")
    if cfg.pruner not in PRUNERS:
        raise _problem(path, f"pruner '{cfg.pruner}': expected one of {', '.join(PRUNERS)}")
    if cfg.trials <= 0 or cfg.heartbeat_s <= 0:
        raise _problem(path, "trials and heartbeat_s must be positive")
    for key, param in cfg.space.items():
        for value in param.values():
            try:
                trial_config(cfg, [_override(key, value)])
            except UserError as e:
                raise _problem(path, f"space key '{key}' = {value!r}: {e}") from None
    _check_inputs(path, cfg)
    if cfg.command == "train":
        _check_blocks_fit(path, cfg)
    return cfg


INPUT_KEYS = {"train": ("data.sources", "data.dataset_dir"), "finetune": ("base", "data.train", "data.val")}
"""The config keys that name files a trial reads, per command."""


def _check_inputs(path: str, cfg: SweepConfig) -> None:
    """The files every trial reads (data sources or a prepared dataset; a fine-tuning base and its examples)
    must exist before the first trial starts: a missing one would fail every trial, each recorded in the study.
    Checked in the fixed config, and at each value of a space key that names one."""
    keys = INPUT_KEYS[cfg.command]
    varied = [[_override(k, v)] for k, p in cfg.space.items() if k in keys for v in p.values()]
    for overrides in [[], *varied]:
        tc = trial_config(cfg, overrides)
        if cfg.command == "finetune":
            named = {"base": [tc.base], "data.train": [tc.data.train], "data.val": [tc.data.val]}
        elif tc.data.dataset_dir:
            named = {"data.dataset_dir": [tc.data.dataset_dir]}
        else:
            named = {"data.sources": tc.data.sources}
        for key, files in named.items():
            for name in filter(None, files):
                _check_input(path, key, name)


def _check_input(path: str, key: str, name: str) -> None:
    """UserError naming ``key`` unless ``name`` exists (a data source may be a glob, which must match; a dataset
    folder must hold a prepared dataset)."""
    where = "" if Path(name).expanduser().is_absolute() else f" (a relative path is read from the working folder, " \
                                                             f"{Path.cwd()})"
    try:
        if key == "data.sources":
            expand_sources([name])
        elif key == "data.dataset_dir":
            load_meta(name)
        elif not Path(name).expanduser().exists():
            raise UserError(f"'{name}' does not exist")
    except UserError as e:
        raise _problem(path, f"{key}: {e}{where}") from None


def _check_blocks_fit(path: str, cfg: SweepConfig) -> None:
    """A prepared dataset every trial shares (data.dataset_dir, outside the space) must hold one block of the
    longest model.block_size a trial may take: known before the study, so refused here, not in every trial.
    (A dataset each trial prepares from data.sources is checked by its first trial.)"""
    fixed = trial_config(cfg, [])
    if not fixed.data.dataset_dir or any(k.startswith("data.") for k in cfg.space):
        return
    sizes = cfg.space["model.block_size"].values() if "model.block_size" in cfg.space else [fixed.model.block_size]
    try:
        meta = load_meta(fixed.data.dataset_dir)
        for split in ("train", "val"):
            open_split(meta, split, int(max(sizes)), None)
    except UserError as e:
        raise _problem(path, str(e)) from None


def trial_config(cfg: SweepConfig, overrides: list[str]):
    """The config of a trial: the base recipe, the sweep's overrides, then the trial's own."""
    load = load_finetune_config if cfg.command == "finetune" else load_train_config
    return load(cfg.base, [*cfg.overrides, *overrides])


def _param(path: str, key: str, spec: object) -> Param:
    if not isinstance(spec, dict) or spec.get("type") not in TYPES:
        raise _problem(path, f"space key '{key}': expected {{type: float|int|categorical, ...}}, got {spec!r}")
    try:
        param = Param(**spec)
    except TypeError as e:
        raise _problem(path, f"space key '{key}': {e}") from None
    if param.type == "categorical":
        if not param.choices:
            raise _problem(path, f"space key '{key}': 'choices' must be a non-empty list")
        return param
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (param.low, param.high)):
        raise _problem(path, f"space key '{key}': 'low' and 'high' must be numbers")
    if not param.low < param.high:
        raise _problem(path, f"space key '{key}': empty range: low {param.low} must be below high {param.high}")
    if param.log and param.low <= 0:
        raise _problem(path, f"space key '{key}': a log range needs low > 0 (got {param.low})")
    return param


def _override(key: str, value: Any) -> str:
    return f"{key}={json.dumps(value)}"


# --- the study --------------------------------------------------------------------------------------------


def make_storage(url: str, heartbeat_s: int | None = None):
    """An Optuna storage for ``url``: an RDB URL (SQLite by default; with a heartbeat and the stale-trial retry
    when ``heartbeat_s``), or journal:PATH for Optuna's JournalFileBackend (several processes can share it)."""
    from optuna.exceptions import StorageInternalError
    from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
    from optuna.storages.journal import JournalFileBackend

    if url.startswith("journal:"):
        return JournalStorage(JournalFileBackend(url.removeprefix("journal:")))
    # Another process holding study.db's write lock (a second sweep, a `--report`, an sqlite3 shell) makes a
    # call wait this long, not SQLite's default 5 s, before "database is locked".
    engine = {"connect_args": {"timeout": SQLITE_BUSY_S}} if url.startswith("sqlite") else None
    if heartbeat_s is None:
        return RDBStorage(url, engine_kwargs=engine)

    class PatientStorage(RDBStorage):  # here, not at the top: optuna is imported only when a sweep runs
        """A heartbeat that cannot be written (the database locked longer than the wait) is a one-line warning,
        once per trial, and is written again at the next beat; it never kills the heartbeat thread."""

        warned: set[int] = set()

        def record_heartbeat(self, trial_id: int) -> None:
            try:
                super().record_heartbeat(trial_id)
            except StorageInternalError as e:
                if trial_id not in self.warned:
                    self.warned.add(trial_id)
                    warnings.warn(f"the study's heartbeat was not written ({_cause(e)}): trying again every "
                                  f"{heartbeat_s} s; the trial goes on", stacklevel=2)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the heartbeat and its retry are marked experimental
        retry = RetryHeartbeatStaleTrialCallback(max_retry=3, inherit_intermediate_values=True)
        return PatientStorage(url, engine_kwargs=engine, heartbeat_interval=heartbeat_s, grace_period=2 * heartbeat_s,
                              heartbeat_stale_trial_callback=retry)


def _cause(e: BaseException) -> str:
    """The one-line reason behind Optuna's storage error (SQLAlchemy's, e.g. 'database is locked')."""
    inner = e.__cause__ or e
    return " ".join(str(getattr(inner, "orig", None) or inner).split())[:200]


def _cannot_open(url: str, e: Exception) -> UserError:
    return UserError(f"--storage {url}: cannot open the study ({type(e).__name__}: {' '.join(str(e).split())[:200]})")


def open_study(cfg: SweepConfig, sweep_dir: Path, name: str, storage_url: str | None):
    """The Optuna study (created, or loaded to continue): SQLite in the sweep directory unless ``storage_url``."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = storage_url or f"sqlite:///{sweep_dir / STUDY_DB}"
    pruner = {"median": optuna.pruners.MedianPruner(n_startup_trials=cfg.startup_trials,
                                                    n_warmup_steps=cfg.warmup_steps),
              "hyperband": optuna.pruners.HyperbandPruner(),
              "asha": optuna.pruners.SuccessiveHalvingPruner(),
              "none": optuna.pruners.NopPruner()}[cfg.pruner]
    try:
        return optuna.create_study(study_name=name, storage=make_storage(url, cfg.heartbeat_s), direction=cfg.direction,
                                   pruner=pruner, load_if_exists=True, sampler=_sampler(cfg, 0))
    except Exception as e:  # noqa: BLE001 - Optuna's and SQLAlchemy's errors for a bad URL or an unwritable file
        raise _cannot_open(url, e) from None


def _sampler(cfg: SweepConfig, drawn: int):
    import optuna

    # Seeded per trial by how many went before (_seed_offset): a restarted sweep draws what an uninterrupted one
    # would, and a trial after a failed one draws new parameters.
    return optuna.samplers.TPESampler(seed=cfg.seed + drawn, n_startup_trials=cfg.startup_trials)


def _seed_offset(study) -> int:
    """Trials finished, or failed for a reason of their own (fail_reason): what the next trial's sampler is seeded
    by. A trial failed by a kill is left out: its retry repeats its parameters, and the restarted sweep then
    draws what an uninterrupted one would."""
    from optuna.trial import TrialState

    failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
    return _finished(study) + sum("fail_reason" in t.user_attrs for t in failed)


def _finished(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def _requeue_interrupted(study) -> None:
    """Queue again (same parameters and intermediate values) each trial stopped by Ctrl-C and not yet retried."""
    from optuna.storages import RetryFailedTrialCallback
    from optuna.trial import TrialState

    retried = {t.system_attrs.get("failed_trial") for t in study.get_trials(deepcopy=False)} | \
        {n for t in study.get_trials(deepcopy=False) for n in t.system_attrs.get("retry_history", [])}
    for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        if t.user_attrs.get("interrupted") and t.number not in retried:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # marked experimental
                RetryFailedTrialCallback(inherit_intermediate_values=True)(study, t)


def _wait_for_stale(study, cfg: SweepConfig, say) -> None:
    """A trial still RUNNING at start-up is one a killed sweep left (or another process runs): wait until its
    heartbeat is stale, so that Optuna fails it and queues its retry before any new trial is drawn."""
    from optuna.storages import fail_stale_trials
    from optuna.trial import TrialState

    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if not running:
        return
    say(f"trial {running[0].number} was running when the sweep stopped: waiting {2 * cfg.heartbeat_s + 1} s for "
        f"its heartbeat to go stale, then it resumes from its last checkpoint")
    time.sleep(2 * cfg.heartbeat_s + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fail_stale_trials(study)


def trial_dir(sweep_dir: Path, number: int) -> Path:
    return sweep_dir / "trials" / f"trial_{number:04d}"


class TrialFailed(Exception):
    """A trial failed for a reason the sweep reported in one line (``fail_reason``); the sweep goes on."""

    def __init__(self, number: int, error: Exception):
        super().__init__(f"trial {number}: {error}")
        self.number, self.error = number, error


class _QuietFailures(logging.Filter):
    """Drops Optuna's log records (a traceback among them) of trials whose failure the sweep reported itself."""

    def __init__(self) -> None:
        super().__init__()
        self.numbers: set[int] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        m = re.match(r"Trial (\d+) failed", record.getMessage())
        return not (m and int(m.group(1)) in self.numbers)


def _objective(cfg: SweepConfig, sweep_dir: Path, say, failures: list[TrialFailed], quiet: _QuietFailures):
    """The objective of one trial. A trial that fails for a reason in TRIAL_FAILURES is recorded FAIL with
    ``fail_reason``, printed in one line, appended to ``failures``, and raised as TrialFailed (which the study
    catches); a trial stopped by Ctrl-C is marked ``interrupted`` and stops the sweep."""
    import optuna
    from optuna.exceptions import StorageInternalError
    from optuna.storages import RetryFailedTrialCallback

    def suggest(trial, key: str, p: Param):
        if p.type == "categorical":
            return trial.suggest_categorical(key, p.choices)
        if p.type == "int":
            return trial.suggest_int(key, int(p.low), int(p.high), log=p.log, step=int(p.step or 1))
        return trial.suggest_float(key, float(p.low), float(p.high), log=p.log, step=p.step)

    def objective(trial) -> float:
        params = {key: suggest(trial, key, p) for key, p in cfg.space.items()}
        frozen = trial.study.get_trials(deepcopy=False)[trial.number]  # its system attrs say what it retries
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # marked experimental
            original = RetryFailedTrialCallback.retried_trial_number(frozen)
        run_dir = trial_dir(sweep_dir, trial.number if original is None else original)
        trial.set_user_attr("run_dir", str(run_dir))
        extra = [] if cfg.command == "finetune" else ["sample.num_samples=0"]
        resume = rundir.is_run_dir(run_dir) and rundir.latest_checkpoint(run_dir) is not None
        if run_dir.exists() and not resume:  # killed before its first checkpoint: nothing to keep
            busy = rundir.being_written(run_dir)  # unless its worker is alive after all (a missed heartbeat)
            if busy is not None:  # not the trial's failure: it stops the sweep, which the CLI says in one line
                quiet.numbers.add(trial.number)
                raise busy
            shutil.rmtree(run_dir)
        pruned = False

        def on_eval(step: int, metrics: dict[str, float]) -> bool:
            nonlocal pruned
            if cfg.metric not in metrics and cfg.metric != "val_ppl":  # exact_match: only at the end
                return False
            try:
                # A retry inherits the steps its failed trial reported (Optuna would warn and ignore them). Not
                # silenced with catch_warnings: that is process-wide, and would swallow the heartbeat thread's.
                if step not in frozen.intermediate_values:
                    trial.report(_metric(metrics, cfg.metric), step)
                pruned = trial.should_prune()
            except StorageInternalError as e:  # the study locked longer than SQLITE_BUSY_S: train on, unpruned
                warnings.warn(f"trial {trial.number}: step {step}'s {cfg.metric} was not reported to the study "
                              f"({_cause(e)}); the trial goes on", stacklevel=2)
            return pruned

        again = f" (trial {original} again, resumed)" if original is not None and resume else \
            f" (trial {original} again)" if original is not None else ""
        say(f"trial {trial.number}{again}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                       for k, v in params.items()), flush=True)
        try:  # everything that may raise a UserError, so that it fails the trial in one line
            tc = trial_config(cfg, [*(_override(k, v) for k, v in params.items()), f"out_dir={run_dir}", *extra])
            if cfg.command == "finetune":
                result = finetune(tc, resume=resume, progress=False, on_eval=on_eval)
                final = result.metrics
            else:
                result = train(tc, resume=resume, progress=False, on_eval=on_eval)
                final = {"val_loss": result.val_loss, "val_bpb": result.val_bpb}
        except TrainingInterrupted:
            trial.set_user_attr("interrupted", True)
            quiet.numbers.add(trial.number)  # the CLI says it in one line
            raise
        except TRIAL_FAILURES as e:
            reason = " ".join(str(e).split())
            trial.set_user_attr("fail_reason", reason)
            say(f"  failed: {reason}", flush=True)
            quiet.numbers.add(trial.number)
            failures.append(TrialFailed(trial.number, e))
            raise failures[-1] from None
        trial.set_user_attr("steps", result.step)
        trial.set_user_attr("train_time_s", result.train_time_s)
        value = _metric(final, cfg.metric)
        say(f"  {'pruned' if pruned else 'done'} at step {result.step}: {cfg.metric} {value:.4f}", flush=True)
        if pruned:
            raise optuna.TrialPruned()
        return value

    return objective


def _metric(metrics: dict[str, float], name: str) -> float:
    return math.exp(metrics["val_loss"]) if name == "val_ppl" else metrics[name]


def run_sweep(path: str, trials: int | None = None, timeout_min: float | None = None, study: str | None = None,
              storage: str | None = None, out_dir: str | None = None, say=print):
    """Run (or continue) the sweep of ``path`` until ``trials`` trials have finished (or ``timeout_min``); returns
    the study. Writes the report at the end (:func:`write_report`)."""
    cfg = load_sweep(path)
    if trials is not None:
        cfg.trials = trials
    name = study or Path(path).stem
    sweep_dir = Path(out_dir or f"sweeps/{name}")
    if storage is None:  # the SQLite file goes into it
        sweep_dir.mkdir(parents=True, exist_ok=True)
    st = open_study(cfg, sweep_dir, name, storage)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    st.set_user_attr("metric", cfg.metric)
    _wait_for_stale(st, cfg, say)
    _requeue_interrupted(st)
    deadline = None if timeout_min is None else time.monotonic() + timeout_min * 60
    failures: list[TrialFailed] = []
    quiet = _QuietFailures()
    objective = _objective(cfg, sweep_dir, say, failures, quiet)
    # Trials to run in this process: a failed one uses up its place (so a sweep whose every trial fails ends),
    # and a later run with the same --trials runs the places still open.
    places = cfg.trials - _finished(st)
    optuna_log = logging.getLogger("optuna.study._optimize")
    optuna_log.addFilter(quiet)
    try:
        for _ in range(places):
            if _finished(st) >= cfg.trials or (deadline is not None and time.monotonic() >= deadline):
                break
            st.sampler = _sampler(cfg, _seed_offset(st))
            n_failed = len(failures)
            st.optimize(objective, n_trials=1, catch=(TrialFailed,))
            if len(failures) > n_failed and isinstance(failures[-1].error, UserError) and not _finished(st):
                # A user mistake before any trial ever finished is, all but surely, in the sweep's fixed config
                # (e.g. a block_size longer than the data): every further trial would fail the same way.
                raise UserError(f"{failures[-1]} (recorded as failed in the study; no further trial was run)")
    finally:
        optuna_log.removeFilter(quiet)
    say(format_report(st, cfg.metric))
    write_report(st, sweep_dir, cfg.metric, say)
    if failures and not _completed(st):
        last = failures[-1]
        kind = TrainingHalted if all(isinstance(f.error, TrainingHalted) for f in failures) else UserError
        raise kind(f"no trial of the sweep succeeded: {len(failures)} failed in this run, the last {last}")
    return st


def _completed(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


# --- the report -------------------------------------------------------------------------------------------


def format_report(st, metric: str) -> str:
    """A table of every trial: number, state, value, steps, time, parameters (and why a failed trial failed)."""
    rows = [("trial", "state", metric, "steps", "time", "params")]
    for t in st.get_trials(deepcopy=False):
        value = f"{t.value:.4f}" if t.value is not None else (
            f"({max(t.intermediate_values.items())[1]:.4f})" if t.intermediate_values else "")
        secs = t.user_attrs.get("train_time_s")
        reason = t.user_attrs.get("fail_reason")
        note = f"failed: {reason}" if reason else "stopped by Ctrl-C" if t.user_attrs.get("interrupted") else ""
        rows.append((str(t.number), t.state.name.lower(), value, str(t.user_attrs.get("steps", "")),
                     f"{secs:.0f} s" if secs is not None else "",
                     " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.params.items())
                     + (f"  | {note}" if note else "")))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:5], widths, strict=True)) + "  " + r[5] for r in rows)


def write_report(st, sweep_dir: Path, metric: str, say=print) -> None:
    """trials.json, best.yaml (the best trial's full config, a ready recipe) and the PNGs
    (optimization history, parameter importances, parallel coordinate) in ``sweep_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as vis

    trials = [{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
               "steps": t.user_attrs.get("steps"), "train_time_s": t.user_attrs.get("train_time_s"),
               "run_dir": t.user_attrs.get("run_dir"), "intermediate": t.intermediate_values,
               "fail_reason": t.user_attrs.get("fail_reason")}
              for t in st.get_trials(deepcopy=False)]
    rundir.write_text_atomic(sweep_dir / "trials.json", json.dumps(trials, indent=1) + "\n")
    if not _completed(st):
        say(f"no complete trial yet: {sweep_dir / 'trials.json'}")
        return
    best = st.best_trial
    best_cfg = yaml.safe_load((Path(best.user_attrs["run_dir"]) / rundir.CONFIG).read_text(encoding="utf-8"))
    best_cfg["out_dir"] = f"runs/{st.study_name}-best"
    header = f"# The best trial ({best.number}, {metric} {best.value:.4f}) of sweep {st.study_name}: " \
             f"lmforge train -c {sweep_dir / 'best.yaml'}\n"
    rundir.write_text_atomic(sweep_dir / "best.yaml", header + yaml.safe_dump(best_cfg, sort_keys=False))
    plots = {"history.png": vis.plot_optimization_history, "importances.png": vis.plot_param_importances,
             "parallel.png": parallel_plot}
    written = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna's matplotlib plots are marked experimental
        for name, plot in plots.items():
            try:
                # Each in matplotlib's default style: optuna's plots switch to ggplot (grey) for the whole process.
                with plt.style.context("default"):
                    ax = plot(st)
            except (ValueError, RuntimeError):  # e.g. importances of a single complete trial
                continue
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).get_figure()
            fig.savefig(sweep_dir / name, dpi=100, bbox_inches="tight")
            plt.close(fig)
            written.append(name)
    say(f"best: trial {best.number}, {metric} {best.value:.4f}, {best.params} | {sweep_dir / 'best.yaml'} | "
        + ", ".join(written))


PARALLEL_COLORS = (0.0, 0.75)
"""The part of viridis that colours trials in parallel.png: its last quarter is too pale to see on white."""


def parallel_plot(st):
    """Optuna's parallel-coordinate plot (one line per complete trial, coloured by its value), on white in viridis
    with a colour bar: optuna's own colours (Blues) draw the worst trials all but white. The best trials are the
    darkest, as in optuna's. Returns the Axes."""
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection
    from matplotlib.colors import ListedColormap
    from optuna.study import StudyDirection
    from optuna.visualization import matplotlib as vis

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # marked experimental
        ax = vis.plot_parallel_coordinate(st)
    cmap = ListedColormap(plt.get_cmap("viridis")(np.linspace(*PARALLEL_COLORS, 256)), name="lmforge_trials")
    if st.direction == StudyDirection.MAXIMIZE:
        cmap = cmap.reversed()
    ax.set_facecolor("white")
    for lines in ax.collections:
        if isinstance(lines, LineCollection):
            lines.set_cmap(cmap)  # the colour bar follows its mappable
    return ax


def report_cli(sweep_dir: str, study: str | None = None, storage: str | None = None) -> None:
    """``lmforge sweep --report DIR``: the table, best.yaml and PNGs of a sweep so far."""
    import optuna

    folder = Path(sweep_dir)
    url = storage or f"sqlite:///{folder / STUDY_DB}"
    if storage is None and not (folder / STUDY_DB).is_file():
        raise UserError(f"'{folder}' holds no sweep ({STUDY_DB} is missing)")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        store = make_storage(url)
        names = optuna.get_all_study_names(store)
    except Exception as e:  # noqa: BLE001 - as in open_study
        raise _cannot_open(url, e) from None
    name = study or (names[0] if len(names) == 1 else None)
    if name not in names:
        raise UserError(f"--study {study!r}: the storage holds {', '.join(names) or 'no study'}")
    st = optuna.load_study(study_name=name, storage=store)
    metric = st.user_attrs.get("metric", "value")
    print(format_report(st, metric))
    write_report(st, folder, metric)


def sweep_command(o: SweepOptions) -> None:
    """``lmforge sweep``: run (or continue) the sweep of ``o.config``, or with ``o.report``, only report one."""
    if o.report:
        report_cli(o.report, study=o.study, storage=o.storage)
    else:
        run_sweep(o.config, trials=o.trials, timeout_min=o.timeout, study=o.study, storage=o.storage, out_dir=o.out)
