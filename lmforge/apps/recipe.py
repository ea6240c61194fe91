"""``lmforge app NAME``: one application end to end, as a recipe.

1. build the task records from local text, split them (:mod:`lmforge.apps.task_records`), and give every
   record its nearest training example (:class:`~lmforge.apps.baselines.NearestNeighbours`);
2. write ``data/train.jsonl`` and ``data/test.jsonl`` (prompt + reference: what ``finetune`` and
   ``eval --generate`` read), for an app with its own base ``data/pretrain.jsonl`` (texts of the training
   records alone, checked against every test input and reference), and ``data/build.json`` (what was read
   and left out);
3. score the baselines on the test records;
4. the base: the app's own (``OUT/base``, pretrained by ``configs/apps/base/NAME.yaml`` on
   ``data/pretrain.jsonl`` with a tokenizer trained on it), or the default run (trained first with the
   ``default`` recipe if it is missing), or ``--base RUN``;
5. fine-tune it with the app's shipped recipe (``configs/apps/NAME.yaml``);
6. evaluate the model on the test records as ``lmforge eval --generate TEST`` does (``eval.json``; with the
   app's beam search also ``eval-beamN.json``), and write ``results.json`` and ``report.md`` (the tables and a
   few examples).

A run holds the writer's lock of its output folder, where ``app.json`` records the settings it was started
with. Run again with the same settings (after a kill, a full disk, Ctrl-C), it continues: the records are
reused, the base and the fine-tuning resume from their latest checkpoints (or start again if they were
stopped before their first), and a finished fine-tuning, or a finished evaluation of its checkpoint on the same
test file, is reused. Every file is written whole (a temporary file renamed) or not at all.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from lmforge import rundir
from lmforge.apps import qa, summarization, translation
from lmforge.apps.baselines import NearestNeighbours
from lmforge.apps.options import DEFAULT_BASE, AppRequest
from lmforge.apps.spec import App
from lmforge.apps.task_records import (
    BuildReport,
    TaskRecord,
    group_hash,
    in_test,
    read_jsonl,
    split_records,
    write_jsonl,
)
from lmforge.config import DEFAULT_RECIPE, RECIPES_DIR, FinetuneConfig, load_finetune_config, load_train_config
from lmforge.errors import TrainingInterrupted, UserError
from lmforge.evaluate import tasks
from lmforge.evaluate.options import EvalRequest
from lmforge.evaluate.runner import evaluate_run, write_report
from lmforge.finetuning.finetune import FinetuneResult, finetune
from lmforge.options import Search
from lmforge.rundir import is_run_dir
from lmforge.training.budget import too_short
from lmforge.training.checkpoint import trainer_meta
from lmforge.training.pretrain import train

APPS: dict[str, App] = {app.name: app for app in (translation.APP, summarization.APP, qa.APP)}
APP_CONFIGS = RECIPES_DIR / "apps"
APP_STATE = "app.json"
DATA_FILES = ("train.jsonl", "test.jsonl", "build.json")
"""What the data stage writes, build.json last (and pretrain.jsonl before it, for an app with its own base)."""
PRETRAIN_FILE = "pretrain.jsonl"
FINETUNE_FILE, DEV_FILE = "finetune.jsonl", "dev.jsonl"
"""An app with dev records (``App.dev_fraction``) fine-tunes on finetune.jsonl (train.jsonl less dev.jsonl, plus
self matches), with dev.jsonl as its validation set and the set its memory threshold is chosen on."""
DEV_KEY = "dev\0"
BASE_PREFIX = "base."
"""``--set base.KEY=VALUE`` sets KEY of the app's own base recipe (the other --set keys are the fine-tuning's)."""
PRETRAIN_DOC_TEXTS = 32
"""Texts per pretraining document (a JSONL line): the unit the base's validation split holds out."""


def get_app(name: str) -> App:
    if name not in APPS:
        raise UserError(f"unknown application '{name}' (expected one of {', '.join(APPS)})")
    return APPS[name]


def build_options(app: App, req: AppRequest) -> dict:
    """The keyword options the app's builder takes from the request (translation: lang)."""
    if req.lang != AppRequest.lang and "lang" not in app.options:
        raise UserError(f"--lang applies to translation, not to {app.name}")
    return {"lang": req.lang} if "lang" in app.options else {}


def build_data(app: App, req: AppRequest, data_dir: Path, say=print) -> tuple[list[TaskRecord], list[TaskRecord]]:
    """Records -> split -> prompts with their nearest training example -> train.jsonl, test.jsonl, build.json."""
    report = BuildReport()
    options = build_options(app, req)
    records = app.build(req.sources, report, **options)
    fraction = req.test_fraction if req.test_fraction is not None else app.test_fraction
    if not 0 < fraction < 1:
        raise UserError(f"--test-fraction {fraction} must be between 0 and 1")
    train_recs, test_recs = split_records(records, fraction, req.split_seed, report, app.distinct_targets)
    for line in report.lines():
        say(f"{app.name}: {line}")
    if not train_recs or not test_recs:
        raise UserError(f"{app.name}: {len(records)} records give {len(train_recs)} train / {len(test_recs)} test; "
                        f"both need at least one (give more sources or another --test-fraction)")
    index = NearestNeighbours([r.source for r in train_recs])
    train_nn = index.query([r.source for r in train_recs], exclude=[r.key for r in train_recs],
                           desc="nearest neighbours (train)")
    test_nn = index.query([r.source for r in test_recs], desc="nearest neighbours (test)")
    rows = {}
    for name, recs, (nn, sims) in (("train", train_recs, train_nn), ("test", test_recs, test_nn)):
        rows[name] = [{"prompt": app.prompt(r, train_recs[j]), "reference": r.target, "source": r.source,
                       "origin": r.origin, "neighbour": j, "similarity": sim}
                      for r, j, sim in zip(recs, nn, sims, strict=True)]
        write_jsonl(data_dir / f"{name}.jsonl", rows[name])
    fit, dev_recs = train_recs, []
    if app.dev_fraction:
        hashes = [group_hash(DEV_KEY + r.key, req.split_seed) for r in train_recs]
        cut = max(app.dev_fraction, min(hashes))  # at least one group, however few records there are
        dev = [h <= cut for h in hashes]
        fit = [r for r, held in zip(train_recs, dev, strict=True) if not held]
        dev_recs = [r for r, held in zip(train_recs, dev, strict=True) if held]
        write_jsonl(data_dir / DEV_FILE, [row for row, held in zip(rows["train"], dev, strict=True) if held])
        write_jsonl(data_dir / FINETUNE_FILE, [row for row, held in zip(rows["train"], dev, strict=True) if not held]
                    + self_matches(app, fit, req.split_seed))
    pretraining = {} if app.pretrain_text is None else {"pretraining": write_pretraining_text(
        app.pretrain_text(fit), test_recs,
        data_dir / PRETRAIN_FILE)}
    build = {"app": app.name, "sources": req.sources or "this machine's own", "options": options,
             "split_seed": req.split_seed, "test_fraction": fraction, "records": len(records),
             "train": len(train_recs), "test": len(test_recs),
             **({"finetune": len(fit), "dev": len(dev_recs)} if app.dev_fraction else {}),
             **report.as_dict(), **pretraining}
    rundir.write_text_atomic(data_dir / "build.json", json.dumps(build, indent=1, ensure_ascii=False) + "\n")
    say(f"{app.name}: {len(train_recs):,} train / {len(test_recs):,} test records in {data_dir}")
    return train_recs, test_recs


def self_matches(app: App, train_recs: list[TaskRecord], seed: int) -> list[dict]:
    """Extra training rows: a share (``app.self_matches``, by a hash of the split seed and the record) of the
    training records with themselves as their nearest example, as a memory's exact match would be."""
    return [{"prompt": app.prompt(r, r), "reference": r.target, "source": r.source, "origin": r.origin,
             "neighbour": i, "similarity": 1.0, "self_match": True} for i, r in enumerate(train_recs)
            if app.self_matches and in_test(f"self-match\0{r.source}", app.self_matches, seed)]


def write_pretraining_text(texts: list[str], held_recs: list[TaskRecord], path: Path) -> dict:
    """``pretrain.jsonl``: the texts (drawn from the training records, dev records left out) as documents of
    :data:`PRETRAIN_DOC_TEXTS` lines. No test input or reference may be among them: the split already keeps every
    test string out of train, and this checks it again on the very text the base will read."""
    held = {s for r in held_recs for s in (r.source, r.target)}
    leaked = [t for t in texts if t in held]
    if leaked:  # a bug, not a user's mistake: the split guarantees it
        raise RuntimeError(f"{len(leaked)} pretraining texts are test inputs or references, e.g. {leaked[0]!r}")
    write_jsonl(path, [{"text": "\n".join(texts[i:i + PRETRAIN_DOC_TEXTS])}
                       for i in range(0, len(texts), PRETRAIN_DOC_TEXTS)])
    return {"texts": len(texts), "characters": sum(map(len, texts)), "test inputs or references among them": 0}


def score_baselines(app: App, train_recs: list[TaskRecord], test_recs: list[TaskRecord],
                    nn: list[int]) -> dict[str, dict]:
    """Each baseline's metrics on the test records, by the evaluator the model is scored with."""
    refs = [[r.target] for r in test_recs]
    outputs = {name: [f(r) for r in test_recs] for name, f in app.baselines.items()}
    outputs["nearest neighbour"] = [train_recs[j].target for j in nn]
    if app.majority:
        top = Counter(r.target for r in train_recs).most_common(1)[0][0]  # ties: the first in (sorted) train
        outputs["most frequent answer"] = [top] * len(test_recs)
    return {name: {**tasks.generation_metrics(out, refs), "outputs": out} for name, out in outputs.items()}


def settings_of(req: AppRequest) -> dict:
    """What decides an app run's records and model: a rerun with the same settings continues the run (the output
    folder, ``--max-test`` and ``--data-only`` are not among them: they say what is done, not how)."""
    return {"app": req.name, "sources": list(req.sources), "lang": req.lang, "base": req.base, "seed": req.seed,
            "split_seed": req.split_seed, "test_fraction": req.test_fraction, "budget_minutes": req.budget_minutes,
            "overrides": list(req.overrides)}


@dataclass
class AppState:
    """``OUT/app.json``: the settings the run in OUT was started with, and the time its invocations spent. Written
    once the records are, so a folder with records and no app.json holds a first build that was stopped."""

    path: Path
    settings: dict
    started: bool
    """Whether an earlier invocation wrote the records (and this file) with these settings."""
    earlier_s: float
    """Seconds the earlier invocations spent."""
    t0: float

    @classmethod
    def open(cls, out: Path, settings: dict) -> AppState:
        """The state of the run in ``out`` (locked by the caller); UserError if ``out`` holds a run started with
        other settings, or something that is not an app run."""
        path, t0 = out / APP_STATE, time.perf_counter()
        if not path.is_file():
            foreign = sorted(p.name for p in out.iterdir() if p.name not in (rundir.LOCK, "data"))
            if foreign:
                raise UserError(f"'{out}' is not the output folder of an `lmforge app` run (no {APP_STATE}; it holds "
                                f"{', '.join(foreign[:3])}): give another --out")
            return cls(path, settings, False, 0.0, t0)
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
            before, earlier = saved["settings"], float(saved["time_s"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"'{path}' is not an {APP_STATE} that `lmforge app` wrote ({e}): give another --out") \
                from None
        if before != settings:
            changed = ", ".join(f"{key} {before.get(key)!r} -> {value!r}" for key, value in settings.items()
                                if before.get(key) != value)
            raise UserError(f"'{out}' holds an app run started with other settings ({changed}): the same command "
                            f"continues it; give another --out for a new one")
        return cls(path, settings, True, earlier, t0)

    def elapsed(self) -> float:
        """Seconds spent on this run by every invocation so far."""
        return self.earlier_s + time.perf_counter() - self.t0

    def save(self) -> None:
        rundir.write_text_atomic(self.path, json.dumps({"settings": self.settings, "time_s": self.elapsed()},
                                                       indent=1) + "\n")


def records_of(rows: list[dict]) -> list[TaskRecord]:
    """Written records read back (without their keys: a key only decides the split, and these are its result)."""
    return [TaskRecord(key="", source=r["source"], target=r["reference"], origin=r["origin"]) for r in rows]


def load_or_build_data(app: App, req: AppRequest, data_dir: Path, state: AppState,
                       say=print) -> tuple[list[TaskRecord], list[TaskRecord]]:
    """The records an earlier invocation with these settings wrote, else built (:func:`build_data`)."""
    files = (*((PRETRAIN_FILE,) if app.pretrain_text is not None else ()),
             *((DEV_FILE, FINETUNE_FILE) if app.dev_fraction else ()), *DATA_FILES)
    if state.started and all((data_dir / name).is_file() for name in files):
        say(f"{app.name}: the records in {data_dir}, built with these settings before")
        return records_of(read_jsonl(data_dir / "train.jsonl")), records_of(read_jsonl(data_dir / "test.jsonl"))
    return build_data(app, req, data_dir, say)


def _last_record(metrics: Path) -> dict:
    try:
        lines = metrics.read_text(encoding="utf-8").splitlines()
        record = json.loads(next(line for line in reversed(lines) if line.strip()))
    except (OSError, StopIteration, ValueError):  # none yet, or a line torn by a kill
        return {}
    return record if isinstance(record, dict) else {}


def training_finished(run: Path) -> bool:
    """Whether the run's training loop ended (its metrics.jsonl ends with the ``done`` record); a model that was not
    trained by lmforge (imported, compressed) counts as finished."""
    if (run / rundir.RUN_INFO).is_file() and rundir.read_run_info(run).kind not in ("pretrain", "finetune"):
        return True
    return _last_record(run / rundir.METRICS).get("kind") == "done"


def finetuning_finished(run: Path) -> bool:
    """Whether ``finetune`` returned: its final evaluation, written last, is there."""
    try:
        return isinstance(json.loads((run / rundir.FINAL_EVAL).read_text(encoding="utf-8")), dict)
    except (OSError, ValueError):
        return False


def continue_or_start(run: Path, finished: Callable[[Path], bool], say=print) -> bool | None:
    """How to go on with the run in ``run`` (its lock held by the caller): None if it finished; True to resume it
    from its latest checkpoint; False to start it, as it is missing or was stopped before its first checkpoint
    (what it wrote is removed then: nothing trained is lost)."""
    if not is_run_dir(run):
        return False
    if finished(run):
        return None
    rundir.remove_temporary_checkpoints(run)
    if rundir.latest_checkpoint(run) is not None:
        say(f"{run} stopped before it finished: resuming it from its latest checkpoint")
        return True
    if rundir.list_checkpoints(run):
        raise UserError(f"cannot continue: {rundir.no_valid_checkpoint(run)}")
    say(f"{run} stopped before its first checkpoint: starting it again")
    for p in run.iterdir():
        if p.name != rundir.LOCK:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    return False


def ensure_base(base: str, say=print) -> None:
    """The default run is trained when it is missing, exactly as ``lmforge train`` with no arguments trains it (the
    ``default`` recipe, into ``runs/default``), and resumed when it was stopped; any other base must exist."""
    path = Path(base)
    if base != DEFAULT_BASE or (path / "config.json").is_file() and not is_run_dir(path):  # given, or imported
        if is_run_dir(path) or (path / "config.json").is_file():
            return
        raise UserError(f"base '{base}' is not a run directory (train one, or leave --base out for {DEFAULT_BASE})")
    if is_run_dir(path) and training_finished(path):
        return
    with rundir.lock(path, create=True):  # nothing else trains it meanwhile; train() takes this lock again
        resume = continue_or_start(path, training_finished, say)
        if resume:
            train(load_train_config(rundir.run_config_path(path), [f"out_dir={path}"]), resume=True)
        elif resume is not None:
            say(f"no {DEFAULT_BASE} yet: training it first, as `lmforge train` does (the '{DEFAULT_RECIPE}' recipe)")
            train(load_train_config(DEFAULT_RECIPE))


def finetune_base(cfg: FinetuneConfig, say=print) -> FinetuneResult:
    """Fine-tune per ``cfg``: anew, on from the latest checkpoint of a stopped run in cfg.out_dir, or not at all when
    the run there finished."""
    run = Path(cfg.out_dir)
    with rundir.lock(run, create=True):  # finetune() takes this lock again
        resume = continue_or_start(run, finetuning_finished, say)
        if resume is not None:
            return finetune(cfg, resume=resume)
        ckpt = rundir.latest_checkpoint(run)
        if ckpt is None:
            raise UserError(f"cannot use the fine-tuned model: {rundir.no_valid_checkpoint(run)}")
        meta = trainer_meta(ckpt)
        say(f"{run} finished fine-tuning before (step {meta['step']}): using it")
        metrics = json.loads((run / rundir.FINAL_EVAL).read_text(encoding="utf-8"))
        planned = meta["planned_steps"] if cfg.train.budget_minutes else 0
        return FinetuneResult(run, meta["step"], metrics, meta["train_time_s"],
                              too_short(planned, cfg.optim.warmup_steps))


def evaluate_model(run: Path, test_path: Path, app: App, out: Path, chat: bool, beams: int = 1, say=print,
                   prefix: str = "eval") -> dict:
    """``eval.json`` (greedy) or ``eval-beamN.json`` (``prefix`` in place of eval): the model's answers to the test
    records, scored; an earlier one of the same checkpoint on the same test records is reused."""
    path = out / (f"{prefix}.json" if beams == 1 else f"{prefix}-beam{beams}.json")
    ckpt = rundir.latest_checkpoint(run)
    try:
        ev = json.loads(path.read_text(encoding="utf-8"))
        if (ckpt is not None and Path(ev["checkpoint"]).resolve() == ckpt.resolve()
                and ev["results"]["generate"]["data_sha256"] == tasks.file_sha256(test_path)):
            say(f"{path}: this checkpoint on these test records, evaluated before")
            return ev
    except (OSError, ValueError, KeyError, TypeError):  # none yet (or not one to trust): evaluate
        pass
    t0 = time.perf_counter()
    ev = evaluate_run(str(run), EvalRequest(generate=str(test_path), chat=chat, batch_size=32,
                                            max_new_tokens=app.max_new_tokens, search=Search(beams=beams)),
                      progress=True)
    ev["eval_s"] = time.perf_counter() - t0
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    os.replace(write_report(ev, tmp), path)
    return ev


MEMORY_THRESHOLDS = (0.0, 0.3, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.01)
"""The memory thresholds tried on the dev records (0: the memory always; 1.01: the model always)."""


def with_memory(rows: list[dict], outputs: list[str], train_recs: list[TaskRecord], threshold: float) -> list[str]:
    """Each record's answer: its memory match's target where the match's similarity reaches ``threshold``, else
    the model's output."""
    return [train_recs[r["neighbour"]].target if r["similarity"] >= threshold else o
            for r, o in zip(rows, outputs, strict=True)]


def choose_threshold(app: App, dev_rows: list[dict], dev_outputs: list[str],
                     train_recs: list[TaskRecord]) -> tuple[float, dict[str, float]]:
    """(the threshold of :data:`MEMORY_THRESHOLDS` whose answers score best on the dev records by the app's
    metric (ties: the highest, which leans on the model), each threshold's score)."""
    refs = [[r["reference"]] for r in dev_rows]
    curve = {f"{t:g}": tasks.generation_metrics(with_memory(dev_rows, dev_outputs, train_recs, t), refs)[app.metric]
             for t in MEMORY_THRESHOLDS}
    best = max(MEMORY_THRESHOLDS, key=lambda t: (curve[f"{t:g}"], t))
    return best, curve


def memory_threshold(app: App, dev_rows: list[dict], dev_outputs: list[str],
                     train_recs: list[TaskRecord]) -> tuple[float | None, dict]:
    """(the chosen threshold, None when the model alone did best; results.json's ``memory`` entry)."""
    threshold, curve = choose_threshold(app, dev_rows, dev_outputs, train_recs)
    chosen = threshold if threshold <= 1 else None
    return chosen, {"memory": {"threshold": chosen, "dev": curve, "dev_records": len(dev_outputs)}}


def recipe_minutes(app: App) -> tuple[float, float]:
    """(pretraining, fine-tuning) minutes of the app's shipped recipes (no pretraining without a base recipe)."""
    def minutes(path: Path) -> float:
        return float((yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("train", {}).get("budget_minutes")
                     or 0.0)

    pretrain = minutes(APP_CONFIGS / "base" / f"{app.name}.yaml") if app.pretrain_text is not None else 0.0
    return pretrain, minutes(APP_CONFIGS / f"{app.name}.yaml")


def budget_overrides(app: App, req: AppRequest) -> tuple[list[str], list[str]]:
    """(the base's, the fine-tuning's) train.budget_minutes overrides for ``--budget-minutes``: the recipe's two
    budgets scaled together to that sum (none without it, or when the app's base is not its own)."""
    if req.budget_minutes is None:
        return [], []
    pretrain, finetuning = recipe_minutes(app)
    if req.base is not None:
        pretrain = 0.0
    scale = req.budget_minutes / (pretrain + finetuning)
    return ([f"train.budget_minutes={pretrain * scale:.4g}"] if pretrain else [],
            [f"train.budget_minutes={finetuning * scale:.4g}"])


def own_base(app: App, req: AppRequest) -> bool:
    """Whether the app pretrains its own base (it has a base recipe, and no --base was given)."""
    return req.base is None and app.pretrain_text is not None


def prepare_base(app: App, req: AppRequest, out: Path, overrides: list[str], say=print) -> Path:
    """The run to fine-tune: ``--base``, or the app's own base in ``OUT/base`` (pretrained on data/pretrain.jsonl
    by its base recipe: resumed when stopped, reused when finished), or the default run (see :func:`ensure_base`)."""
    if not own_base(app, req):
        base = req.base or DEFAULT_BASE
        ensure_base(base, say)
        return Path(base)
    run = out / "base"
    with rundir.lock(run, create=True):  # train() takes this lock again
        resume = continue_or_start(run, training_finished, say)
        if resume:
            train(load_train_config(rundir.run_config_path(run), [f"out_dir={run}"]), resume=True)
        elif resume is not None:
            say(f"{app.name}: pretraining its own base on the training records' text ({run})")
            train(load_train_config(APP_CONFIGS / "base" / f"{app.name}.yaml", [
                f"out_dir={run}", f"data.sources=[{out / 'data' / PRETRAIN_FILE}]", f"train.seed={req.seed}",
                *overrides]))
    return run


def run_app(req: AppRequest, say=print) -> dict:
    """The whole recipe (see the module docstring); the results, also written to OUT/results.json."""
    app = get_app(req.name)
    out = Path(req.out_dir or f"runs/apps/{app.name}-seed{req.seed}")
    data_dir = out / "data"
    base_budget, finetune_budget = budget_overrides(app, req)
    base_overrides = [o.removeprefix(BASE_PREFIX) for o in req.overrides if o.startswith(BASE_PREFIX)]
    if base_overrides and not own_base(app, req):
        raise UserError(f"--set {BASE_PREFIX}KEY=VALUE sets the app's own base recipe, and {app.name} "
                        f"{'has none' if app.pretrain_text is None else 'fine-tunes --base ' + str(req.base)}")
    base = out / "base" if own_base(app, req) else Path(req.base or DEFAULT_BASE)
    cfg = load_finetune_config(APP_CONFIGS / f"{app.name}.yaml", [
        f"base={base}", f"out_dir={out / 'model'}",
        *([f"data.train={data_dir / FINETUNE_FILE}", f"data.val={data_dir / DEV_FILE}"] if app.dev_fraction
          else [f"data.train={data_dir / 'train.jsonl'}"]),
        f"train.seed={req.seed}", f"data.seed={req.seed}", *finetune_budget,
        *(o for o in req.overrides if not o.startswith(BASE_PREFIX))])
    if out.exists() and not out.is_dir():
        raise UserError(f"--out '{out}' is a file (expected a folder)")
    if out.is_dir():
        AppState.open(out, settings_of(req))  # refused before its lock writes anything into another's folder
    with rundir.lock(out, create=True):  # one writer; the fine-tuning run in OUT/model has its own lock
        state = AppState.open(out, settings_of(req))
        train_recs, test_recs = load_or_build_data(app, req, data_dir, state, say)  # bad sources fail here, first
        state.save()
        if req.data_only:
            return {"data": str(data_dir)}
        try:
            return _model_and_report(app, req, cfg, state, train_recs, test_recs, [*base_budget, *base_overrides],
                                     say)
        except TrainingInterrupted as e:
            raise TrainingInterrupted(f"{e}, or run this `lmforge app` command again: it goes on from there") \
                from None


def _model_and_report(app: App, req: AppRequest, cfg: FinetuneConfig, state: AppState, train_recs: list[TaskRecord],
                      test_recs: list[TaskRecord], base_budget: list[str], say=print) -> dict:
    """The recipe after the records: the base, the baselines, fine-tuning, evaluation, results.json and report.md."""
    out = state.path.parent
    base = prepare_base(app, req, out, base_budget, say)
    state.save()
    test_path = out / "data" / "test.jsonl"
    rows = read_jsonl(test_path)
    if req.max_test is not None:
        rows, test_recs = rows[:req.max_test], test_recs[:req.max_test]
        test_path = test_path.with_name("test_subset.jsonl")
        write_jsonl(test_path, rows)
    baselines = score_baselines(app, train_recs, test_recs, [row["neighbour"] for row in rows])

    result = finetune_base(cfg, say)
    state.save()
    seq2seq = cfg.task == "seq2seq"
    searches = {"greedy": 1, **({f"beam{app.beams}": app.beams} if seq2seq and app.beams > 1 else {})}
    evals = {}
    for label, beams in searches.items():
        evals[label] = evaluate_model(result.run_dir, test_path, app, out, chat=not seq2seq, beams=beams, say=say)
        state.save()
    keys = tasks.generation_metrics(["x"], [["x"]])
    by_search = {label: {k: ev["results"]["generate"][k] for k in keys if k in ev["results"]["generate"]}
                 | {"eval_s": ev.get("eval_s")} for label, ev in evals.items()}
    main = "greedy" if app.greedy_main else list(searches)[-1]  # else the beam's, when there is one
    outputs = {label: ev["results"]["generate"]["outputs"] for label, ev in evals.items()}
    model = {k: v for k, v in by_search[main].items() if k != "eval_s"}
    memory = {}
    if app.memory:
        dev = evaluate_model(result.run_dir, out / "data" / DEV_FILE, app, out, chat=not seq2seq,
                             beams=searches[main], say=say, prefix="dev")
        state.save()
        threshold, memory = memory_threshold(app, read_jsonl(out / "data" / DEV_FILE),
                                             dev["results"]["generate"]["outputs"], train_recs)
        if threshold is not None:  # else the model alone did best on the dev records
            label = f"{main} + memory ≥ {threshold:g}"
            outputs[label] = with_memory(rows, outputs[main], train_recs, threshold)
            by_search[label] = tasks.generation_metrics(outputs[label], [[r.target] for r in test_recs])
            main, model = label, dict(by_search[label])
    bar_name = max(baselines, key=lambda b: baselines[b][app.metric])
    parts = {} if app.part is None else {"parts": by_part(app, rows, outputs[main], baselines)}
    breakdown = {} if app.breakdown is None else {
        "breakdown": {**{f"model ({label})": app.breakdown(rows, out_) for label, out_ in outputs.items()},
                      **{name: app.breakdown(rows, b["outputs"]) for name, b in baselines.items()}}}
    meta = trainer_meta(rundir.latest_checkpoint(base)) if own_base(app, req) else None
    results = {
        "app": app.name, "seed": req.seed, "metric": app.metric, "base": str(base),
        "base_steps": meta and meta["step"], "base_s": meta and meta["train_time_s"], "search": main,
        "model_dir": str(result.run_dir), "train_records": len(train_recs), "test_records": len(test_recs),
        "finetune_steps": result.step, "too_short": result.too_short, "finetune_s": result.train_time_s,
        "total_s": state.elapsed(), "model": model, "searches": by_search,
        "baselines": {k: {m: v for m, v in b.items() if m != "outputs"} for k, b in baselines.items()},
        "bar": {"baseline": bar_name, "value": baselines[bar_name][app.metric]},
        "beats_bar": model[app.metric] > baselines[bar_name][app.metric]
        and all(p["beats_bar"] for p in parts.get("parts", {}).values()), **parts, **breakdown, **memory}
    rundir.write_text_atomic(out / "results.json", json.dumps(results, indent=1) + "\n")
    rundir.write_text_atomic(out / "report.md", format_report(app, results, test_recs, outputs[main], baselines))
    for line in format_table(app, results).splitlines() + (format_parts(app, results).splitlines() if parts else []):
        say(line)
    say(f"wrote {out / 'report.md'} and {out / 'results.json'}")
    return results


def by_part(app: App, rows: list[dict], outputs: list[str], baselines: dict[str, dict]) -> dict:
    """Each part's figures (``app.part``): its examples, the model's and every baseline's metrics, its own bar (the
    strongest baseline on that part) and whether the model beats it."""
    labels = [app.part(r) for r in rows]
    parts = {}
    for name in sorted(set(labels)):
        picked = [i for i, label in enumerate(labels) if label == name]
        refs = [[rows[i]["reference"]] for i in picked]
        scored = {b: tasks.generation_metrics([v["outputs"][i] for i in picked], refs) for b, v in baselines.items()}
        bar = max(scored, key=lambda b: scored[b][app.metric])
        model = tasks.generation_metrics([outputs[i] for i in picked], refs)
        parts[name] = {"examples": len(picked), "model": model, "baselines": scored,
                       "bar": {"baseline": bar, "value": scored[bar][app.metric]},
                       "beats_bar": model[app.metric] > scored[bar][app.metric]}
    return parts


def format_parts(app: App, results: dict) -> str:
    """The main metric of the model and every baseline on each part, as a markdown table (the bar in bold)."""
    parts = results["parts"]
    names = list(next(iter(parts.values()))["baselines"])
    head = (f"| {app.metric} by part | model | " + " | ".join(names) + " |\n|---|" + "---:|" * (len(names) + 1)
            + "\n")
    return head + "".join(
        f"| {part} ({p['examples']}) | {p['model'][app.metric]:.2f} | "
        + " | ".join(f"**{v[app.metric]:.2f}**" if b == p["bar"]["baseline"] else f"{v[app.metric]:.2f}"
                     for b, v in p["baselines"].items()) + " |\n"
        for part, p in parts.items())


def format_table(app: App, results: dict) -> str:
    """The model and every baseline on the app's metrics, as a markdown table."""
    head = "| | " + " | ".join(app.metrics) + " |\n|---|" + "---:|" * len(app.metrics) + "\n"
    searches = results.get("searches") or {"": results["model"]}
    models = [(f"model ({label})" if len(searches) > 1 else "model", m)
              for label, m in sorted(searches.items(), key=lambda kv: kv[0] != results.get("search"))]
    rows = [*models, *results["baselines"].items()]
    return head + "".join(f"| {name} | " + " | ".join(f"{m[k]:.2f}" for k in app.metrics) + " |\n"
                          for name, m in rows)


def format_breakdown(results: dict) -> str:
    """Translation's figures by the memory's similarity band, and the placeholders kept, as a markdown table."""
    rows = results["breakdown"]
    bands = next(iter(rows.values()))["bands"]  # every row has the same bands, of the same records
    head = ("| chrF by the memory's similarity | " + " | ".join(f"{b} ({n['examples']})" for b, n in bands.items())
            + " | placeholders kept (all / where any) |\n|---|" + "---:|" * (len(bands) + 1) + "\n")
    return head + "".join(
        f"| {name} | " + " | ".join("-" if r["bands"][b]["chrf"] is None else f"{r['bands'][b]['chrf']:.2f}"
                                    for b in bands)
        + " | " + " / ".join("-" if v is None else f"{v:.1f}%"
                             for v in (r["placeholders_kept"], r["placeholders_kept_where_any"])) + " |\n"
        for name, r in rows.items())


def format_report(app: App, results: dict, test_recs: list[TaskRecord], outputs: list[str],
                  baselines: dict[str, dict], examples: int = 5) -> str:
    """report.md: what was run, the table, and the first few test records side by side."""
    verdict = "beats" if results["model"][app.metric] > results["bar"]["value"] else "does not beat"
    lines = [f"# {app.name}: {app.summary}", "",
             f"{results['train_records']:,} train / {results['test_records']:,} test records; fine-tuned "
             f"{results['finetune_steps']} steps ({results['finetune_s'] / 60:.1f} min) from {results['base']}"
             + (f" (pretrained {results['base_steps']} steps, {results['base_s'] / 60:.1f} min, on the training "
                f"records' text)" if results.get("base_steps") else "")
             + f", seed {results['seed']}; {results['total_s'] / 60:.1f} min in all.", "",
             *([f"**Warning**: the fine-tuning was {results['too_short']}: this machine was too slow for the "
                f"recipe's time budget (a longer `--set train.budget_minutes=M`, or a quieter machine).", ""]
               if results.get("too_short") else []),
             format_table(app, results),
             f"The model {verdict} the strongest baseline ({results['bar']['baseline']}, "
             f"{app.metric} {results['bar']['value']:.2f}) with {app.metric} {results['model'][app.metric]:.2f}"
             f" ({results.get('search', 'greedy')})"
             + (", and it must beat each part's own (below)." if results.get("parts") else "."), "",
             *([format_parts(app, results), "The model " + " and ".join(
                 f"{'beats' if p['beats_bar'] else 'does not beat'} {p['bar']['baseline']} on {part}"
                 for part, p in results["parts"].items()) + ".", ""] if results.get("parts") else []),
             *([format_breakdown(results)] if results.get("breakdown") else []),
             "## Examples", ""]
    nn = baselines["nearest neighbour"]["outputs"]
    for r, out, near in list(zip(test_recs, outputs, nn, strict=True))[:examples]:
        lines += [f"**Input** ({r.origin})", "", "```", r.source, "```", "",
                  f"- reference: {r.target!r}", f"- model: {out!r}", f"- nearest neighbour: {near!r}", ""]
    return "\n".join(lines)


def summarize_seeds(results: list[dict]) -> dict:
    """Mean and sample sd of the main metric over seeds, beside the (seed-independent) bar; the same for each part
    of an app with parts (summarization: code, man pages)."""
    def spread(values: list[float]) -> dict:
        return {"values": values, "mean": statistics.mean(values),
                "sd": statistics.stdev(values) if len(values) > 1 else 0.0}

    metric = results[0]["metric"]
    parts = {name: {**spread([r["parts"][name]["model"][metric] for r in results]), "examples": part["examples"],
                    "bar": part["bar"], "baselines": {b: v[metric] for b, v in part["baselines"].items()}}
             for name, part in (results[0].get("parts") or {}).items()}
    return {"app": results[0]["app"], "metric": metric, "seeds": [r["seed"] for r in results],
            **spread([r["model"][metric] for r in results]), "bar": results[0]["bar"],
            **({"parts": parts} if parts else {})}
