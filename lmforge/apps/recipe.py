"""``lmforge app NAME``: one application end to end, as a recipe.

1. build the task records from local text, split them (:mod:`lmforge.apps.task_records`), and give every
   record its nearest training example (:class:`~lmforge.apps.baselines.NearestNeighbours`);
2. write ``data/train.jsonl`` and ``data/test.jsonl`` (prompt + reference: what ``finetune`` and
   ``eval --generate`` read) and ``data/build.json`` (what was read and left out);
3. score the baselines on the test records;
4. fine-tune the base run (the default run, trained first with the ``default`` recipe if it is missing)
   with the app's shipped recipe (``configs/apps/NAME.yaml``) on the chat/SFT path;
5. evaluate the model on the test records as ``lmforge eval --generate TEST --chat`` does (``eval.json``),
   and write ``results.json`` and ``report.md`` (the table and a few examples).

A run holds the writer's lock of its output folder, where ``app.json`` records the settings it was started
with. Run again with the same settings (after a kill, a full disk, Ctrl-C), it continues: the records are
reused, the default run and the fine-tuning resume from their latest checkpoints (or start again if they were
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

from lmforge import rundir
from lmforge.apps import qa, summarization, translation
from lmforge.apps.baselines import NearestNeighbours
from lmforge.apps.options import DEFAULT_BASE, AppRequest
from lmforge.apps.spec import App
from lmforge.apps.task_records import BuildReport, TaskRecord, read_jsonl, split_records, write_jsonl
from lmforge.config import DEFAULT_RECIPE, RECIPES_DIR, FinetuneConfig, load_finetune_config, load_train_config
from lmforge.errors import TrainingInterrupted, UserError
from lmforge.evaluate import tasks
from lmforge.evaluate.options import EvalRequest
from lmforge.evaluate.runner import evaluate_run, write_report
from lmforge.finetuning.finetune import FinetuneResult, finetune
from lmforge.rundir import is_run_dir
from lmforge.training.budget import too_short
from lmforge.training.checkpoint import trainer_meta
from lmforge.training.pretrain import train

APPS: dict[str, App] = {app.name: app for app in (translation.APP, summarization.APP, qa.APP)}
APP_CONFIGS = RECIPES_DIR / "apps"
APP_STATE = "app.json"
DATA_FILES = ("train.jsonl", "test.jsonl", "build.json")
"""What the data stage writes, build.json last."""


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
    for name, recs, nn in (("train", train_recs, train_nn), ("test", test_recs, test_nn)):
        write_jsonl(data_dir / f"{name}.jsonl",
                    [{"prompt": app.prompt(r, train_recs[j]), "reference": r.target, "source": r.source,
                      "origin": r.origin, "neighbour": j} for r, j in zip(recs, nn, strict=True)])
    build = {"app": app.name, "sources": req.sources or "this machine's own", "options": options,
             "split_seed": req.split_seed, "test_fraction": fraction, "records": len(records),
             "train": len(train_recs), "test": len(test_recs), **report.as_dict()}
    rundir.write_text_atomic(data_dir / "build.json", json.dumps(build, indent=1, ensure_ascii=False) + "\n")
    say(f"{app.name}: {len(train_recs):,} train / {len(test_recs):,} test records in {data_dir}")
    return train_recs, test_recs


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
            "split_seed": req.split_seed, "test_fraction": req.test_fraction, "overrides": list(req.overrides)}


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
    if state.started and all((data_dir / name).is_file() for name in DATA_FILES):
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


def evaluate_model(run: Path, test_path: Path, app: App, out: Path, say=print) -> dict:
    """``eval.json``: the model's generations on the test records, scored; an earlier one of the same checkpoint on
    the same test records is reused."""
    path = out / "eval.json"
    ckpt = rundir.latest_checkpoint(run)
    try:
        ev = json.loads(path.read_text(encoding="utf-8"))
        if (ckpt is not None and Path(ev["checkpoint"]).resolve() == ckpt.resolve()
                and ev["results"]["generate"]["data_sha256"] == tasks.file_sha256(test_path)):
            say(f"{path}: this checkpoint on these test records, evaluated before")
            return ev
    except (OSError, ValueError, KeyError, TypeError):  # none yet (or not one to trust): evaluate
        pass
    ev = evaluate_run(str(run), EvalRequest(generate=str(test_path), chat=True, batch_size=32,
                                            max_new_tokens=app.max_new_tokens), progress=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    os.replace(write_report(ev, tmp), path)
    return ev


def run_app(req: AppRequest, say=print) -> dict:
    """The whole recipe (see the module docstring); the results, also written to OUT/results.json."""
    app = get_app(req.name)
    out = Path(req.out_dir or f"runs/apps/{app.name}-seed{req.seed}")
    data_dir = out / "data"
    cfg = load_finetune_config(APP_CONFIGS / f"{app.name}.yaml", [
        f"base={req.base}", f"out_dir={out / 'model'}", f"data.train={data_dir / 'train.jsonl'}",
        f"train.seed={req.seed}", f"data.seed={req.seed}", *req.overrides])
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
            return _model_and_report(app, req, cfg, state, train_recs, test_recs, say)
        except TrainingInterrupted as e:
            raise TrainingInterrupted(f"{e}, or run this `lmforge app` command again: it goes on from there") \
                from None


def _model_and_report(app: App, req: AppRequest, cfg: FinetuneConfig, state: AppState, train_recs: list[TaskRecord],
                      test_recs: list[TaskRecord], say=print) -> dict:
    """The recipe after the records: the base, the baselines, fine-tuning, evaluation, results.json and report.md."""
    out = state.path.parent
    ensure_base(req.base, say)
    state.save()
    test_path = out / "data" / "test.jsonl"
    if req.max_test is not None:
        rows = read_jsonl(test_path)[:req.max_test]
        test_recs = test_recs[:req.max_test]
        test_path = test_path.with_name("test_subset.jsonl")
        write_jsonl(test_path, rows)
    nn = [row["neighbour"] for row in read_jsonl(test_path)]
    baselines = score_baselines(app, train_recs, test_recs, nn)

    result = finetune_base(cfg, say)
    state.save()
    ev = evaluate_model(result.run_dir, test_path, app, out, say)
    state.save()
    gen = ev["results"]["generate"]
    model = {k: gen[k] for k in (*tasks.generation_metrics(["x"], [["x"]]),) if k in gen}
    bar_name = max(baselines, key=lambda b: baselines[b][app.metric])
    results = {
        "app": app.name, "seed": req.seed, "metric": app.metric, "base": req.base, "model_dir": str(result.run_dir),
        "train_records": len(train_recs), "test_records": len(test_recs), "finetune_steps": result.step,
        "too_short": result.too_short, "finetune_s": result.train_time_s, "total_s": state.elapsed(),
        "model": model, "baselines": {k: {m: v for m, v in b.items() if m != "outputs"} for k, b in baselines.items()},
        "bar": {"baseline": bar_name, "value": baselines[bar_name][app.metric]},
        "beats_bar": model[app.metric] > baselines[bar_name][app.metric]}
    rundir.write_text_atomic(out / "results.json", json.dumps(results, indent=1) + "\n")
    rundir.write_text_atomic(out / "report.md", format_report(app, results, test_recs, gen["outputs"], baselines))
    for line in format_table(app, results).splitlines():
        say(line)
    say(f"wrote {out / 'report.md'} and {out / 'results.json'}")
    return results


def format_table(app: App, results: dict) -> str:
    """The model and every baseline on the app's metrics, as a markdown table."""
    head = "| | " + " | ".join(app.metrics) + " |\n|---|" + "---:|" * len(app.metrics) + "\n"
    rows = [("model", results["model"]), *results["baselines"].items()]
    return head + "".join(f"| {name} | " + " | ".join(f"{m[k]:.2f}" for k in app.metrics) + " |\n"
                          for name, m in rows)


def format_report(app: App, results: dict, test_recs: list[TaskRecord], outputs: list[str],
                  baselines: dict[str, dict], examples: int = 5) -> str:
    """report.md: what was run, the table, and the first few test records side by side."""
    verdict = "beats" if results["beats_bar"] else "does not beat"
    lines = [f"# {app.name}: {app.summary}", "",
             f"{results['train_records']:,} train / {results['test_records']:,} test records; fine-tuned "
             f"{results['finetune_steps']} steps ({results['finetune_s'] / 60:.1f} min) from {results['base']}, "
             f"seed {results['seed']}; {results['total_s'] / 60:.1f} min in all.", "",
             *([f"**Warning**: the fine-tuning was {results['too_short']}: this machine was too slow for the "
                f"recipe's time budget (a longer `--set train.budget_minutes=M`, or a quieter machine).", ""]
               if results.get("too_short") else []),
             format_table(app, results),
             f"The model {verdict} the strongest baseline ({results['bar']['baseline']}, "
             f"{app.metric} {results['bar']['value']:.2f}) with {app.metric} {results['model'][app.metric]:.2f}.", "",
             "## Examples", ""]
    nn = baselines["nearest neighbour"]["outputs"]
    for r, out, near in list(zip(test_recs, outputs, nn, strict=True))[:examples]:
        lines += [f"**Input** ({r.origin})", "", "```", r.source, "```", "",
                  f"- reference: {r.target!r}", f"- model: {out!r}", f"- nearest neighbour: {near!r}", ""]
    return "\n".join(lines)


def summarize_seeds(results: list[dict]) -> dict:
    """Mean and sample sd of the main metric over seeds, beside the (seed-independent) bar."""
    values = [r["model"][r["metric"]] for r in results]
    return {"app": results[0]["app"], "metric": results[0]["metric"], "seeds": [r["seed"] for r in results],
            "values": values, "mean": statistics.mean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else 0.0, "bar": results[0]["bar"]}
