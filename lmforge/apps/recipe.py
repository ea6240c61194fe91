"""``lmforge app NAME``: one application end to end, as a recipe.

1. build the task records from local text, split them (:mod:`lmforge.apps.task_records`), and give every
   record its nearest training example (:class:`~lmforge.apps.baselines.NearestNeighbours`);
2. write ``data/train.jsonl`` and ``data/test.jsonl`` (prompt + reference: what ``finetune`` and
   ``eval --generate`` read) and ``data/build.json`` (what was read and left out);
3. score the baselines on the test records;
4. fine-tune the base run (the default run, trained first if it is missing) with the app's shipped
   recipe (``configs/apps/NAME.yaml``) on the chat/SFT path;
5. evaluate the model on the test records as ``lmforge eval --generate TEST --chat`` does (``eval.json``),
   and write ``results.json`` and ``report.md`` (the table and a few examples).
"""

from __future__ import annotations

import json
import statistics
import time
from collections import Counter
from pathlib import Path

from lmforge.apps import qa, summarization, translation
from lmforge.apps.baselines import NearestNeighbours
from lmforge.apps.options import DEFAULT_BASE, AppRequest
from lmforge.apps.spec import App
from lmforge.apps.task_records import BuildReport, TaskRecord, read_jsonl, split_records, write_jsonl
from lmforge.config import RECIPES_DIR, load_finetune_config, load_train_config
from lmforge.errors import UserError
from lmforge.evaluate import tasks
from lmforge.evaluate.options import EvalRequest
from lmforge.evaluate.runner import evaluate_run, write_report
from lmforge.finetuning.finetune import finetune
from lmforge.rundir import is_run_dir
from lmforge.training.pretrain import train

APPS: dict[str, App] = {app.name: app for app in (translation.APP, summarization.APP, qa.APP)}
APP_CONFIGS = RECIPES_DIR / "apps"


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
    (data_dir / "build.json").write_text(json.dumps(build, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
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


def ensure_base(base: str, say=print) -> None:
    """The default run is trained (the main job) when it is missing; any other base must exist."""
    if is_run_dir(Path(base)) or Path(base, "config.json").is_file():
        return
    if base != DEFAULT_BASE:
        raise UserError(f"base '{base}' is not a run directory (train one, or leave --base out for {DEFAULT_BASE})")
    say(f"no {DEFAULT_BASE} yet: training it first (what `lmforge train` does)")
    train(load_train_config(None))


def run_app(req: AppRequest, say=print) -> dict:
    """The whole recipe (see the module docstring); the results, also written to OUT/results.json."""
    app = get_app(req.name)
    start = time.perf_counter()
    out = Path(req.out_dir or f"runs/apps/{app.name}-seed{req.seed}")
    data_dir = out / "data"
    cfg = load_finetune_config(APP_CONFIGS / f"{app.name}.yaml", [
        f"base={req.base}", f"out_dir={out / 'model'}", f"data.train={data_dir / 'train.jsonl'}",
        f"train.seed={req.seed}", f"data.seed={req.seed}", *req.overrides])
    if not req.data_only and Path(cfg.out_dir).exists():
        raise UserError(f"'{cfg.out_dir}' already exists: give another --out (each recipe run starts fresh)")
    train_recs, test_recs = build_data(app, req, data_dir, say)  # bad sources are found here, before any training
    if req.data_only:
        return {"data": str(data_dir)}
    ensure_base(req.base, say)
    test_path = data_dir / "test.jsonl"
    if req.max_test is not None:
        rows = read_jsonl(test_path)[:req.max_test]
        test_recs = test_recs[:req.max_test]
        test_path = data_dir / "test_subset.jsonl"
        write_jsonl(test_path, rows)
    nn = [row["neighbour"] for row in read_jsonl(test_path)]
    baselines = score_baselines(app, train_recs, test_recs, nn)

    result = finetune(cfg)
    ev = evaluate_run(str(result.run_dir), EvalRequest(generate=str(test_path), chat=True, batch_size=32,
                                                       max_new_tokens=app.max_new_tokens), progress=True)
    write_report(ev, out / "eval.json")
    gen = ev["results"]["generate"]
    model = {k: gen[k] for k in (*tasks.generation_metrics(["x"], [["x"]]),) if k in gen}
    bar_name = max(baselines, key=lambda b: baselines[b][app.metric])
    results = {
        "app": app.name, "seed": req.seed, "metric": app.metric, "base": req.base, "model_dir": str(result.run_dir),
        "train_records": len(train_recs), "test_records": len(test_recs), "finetune_steps": result.step,
        "finetune_s": result.train_time_s, "total_s": time.perf_counter() - start,
        "model": model, "baselines": {k: {m: v for m, v in b.items() if m != "outputs"} for k, b in baselines.items()},
        "bar": {"baseline": bar_name, "value": baselines[bar_name][app.metric]},
        "beats_bar": model[app.metric] > baselines[bar_name][app.metric]}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    (out / "report.md").write_text(
        format_report(app, results, test_recs, gen["outputs"], baselines), encoding="utf-8")
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
