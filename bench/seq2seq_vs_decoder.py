"""An encoder-decoder against the decoder for translation, at equal wall time, for BENCHMARKS.md.

    python bench/seq2seq_vs_decoder.py [--dir runs/s2s-vs-dec] [--pretrain-minutes 2] [--finetune-minutes 4]
                                       [--seeds 0 1 2] [--max-test N] [--json bench/results/seq2seq_vs_decoder.json]

The records are the translation app's (``lmforge app translation --data-only``: English -> German gettext messages,
each prompt showing its translation memory's nearest training example, the reference the German). Per seed, two
contenders get the same minutes of pretraining and the same minutes of fine-tuning:

* ``decoder``: the default recipe (Llama-style 4x4x256: RoPE, RMSNorm, SwiGLU) pretrained as a language model on the
  default corpus, then fine-tuned as the app does (its shipped ``configs/apps/translation.yaml``: chat SFT, packed);
* ``encoder_decoder``: the same recipe with ``model.arch=encoder_decoder model.n_layer=2`` (2 encoder + 2 decoder
  blocks of the same width and parts) pretrained by denoising (BART's text infilling) on the same corpus, then
  ``task=seq2seq`` (the prompt is the source, the reference the target) with the app recipe's optimizer and budget.

Both then write the test records' translations greedily (at most the app's 80 new tokens; the encoder-decoder also
with 4 beams), scored by ``lmforge eval --generate`` (sacrebleu chrF and BLEU). The contenders take turns going
first. A finished stage (a run whose training ended, or an eval report) is read, not run again, so a killed bench
continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

from lmforge import rundir
from lmforge.apps.options import AppRequest
from lmforge.apps.recipe import APP_CONFIGS, run_app, training_finished
from lmforge.config import load_finetune_config, load_train_config
from lmforge.evaluate.options import EvalRequest
from lmforge.evaluate.runner import evaluate_run, write_report
from lmforge.finetuning.finetune import finetune
from lmforge.hardware import cpu_name
from lmforge.options import GREEDY, Search
from lmforge.training.checkpoint import trainer_meta
from lmforge.training.pretrain import train

ARCH = {"decoder": [], "encoder_decoder": ["model.arch=encoder_decoder", "model.n_layer=2"]}
MAX_NEW_TOKENS = 80  # the translation app's


def _flatten(section: dict, prefix: str) -> list[str]:
    return [f"{prefix}.{k}={v}" for k, v in section.items()]


def finetune_overrides(contender: str, base: Path, out: Path, train_file: Path, seed: int, minutes: float,
                       extra: list[str], decoder_extra: list[str]) -> tuple:
    """(recipe, overrides): the app's shipped recipe for the decoder, then ``decoder_extra`` (--decoder-set); its
    optimizer and training settings with task=seq2seq for the encoder-decoder, then ``extra`` (--seq2seq-set)."""
    common = [f"base={base}", f"out_dir={out}", f"data.train={train_file}", f"train.seed={seed}", f"data.seed={seed}",
              f"train.budget_minutes={minutes}"]
    recipe = APP_CONFIGS / "translation.yaml"
    if contender == "decoder":
        return recipe, [*common, *decoder_extra]
    shipped = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    train_keys = {k: v for k, v in shipped["train"].items() if k != "budget_minutes"}
    return None, ["task=seq2seq", f"data.val_fraction={shipped['data']['val_fraction']}",
                  *_flatten(shipped["optim"], "optim"), *_flatten(train_keys, "train"), *common, *extra]


def evaluate(run: Path, test: Path, out: Path, chat: bool, beams: int = 1) -> dict:
    if out.is_file():
        return json.loads(out.read_text(encoding="utf-8"))
    t0 = time.perf_counter()
    report = evaluate_run(str(run), EvalRequest(generate=str(test), chat=chat, batch_size=32,
                                                max_new_tokens=MAX_NEW_TOKENS, sampling=GREEDY,
                                                search=Search(beams=beams)), progress=True)
    report["eval_s"] = time.perf_counter() - t0
    write_report(report, out)
    return report


def one(contender: str, seed: int, root: Path, data: Path, args: argparse.Namespace) -> dict:
    folder = root / f"{contender}-seed{seed}"
    base, model = folder / "base", folder / "model"
    if not training_finished(base):
        train(load_train_config("default", [f"out_dir={base}", f"train.seed={seed}",
                                            f"train.budget_minutes={args.pretrain_minutes}", *ARCH[contender]]))
    if not (model / "final_eval.json").is_file():
        recipe, overrides = finetune_overrides(contender, base, model, data / "train.jsonl", seed,
                                               args.finetune_minutes, args.seq2seq_set, args.decoder_set)
        finetune(load_finetune_config(recipe, overrides))
    test = data / "test.jsonl"
    if args.max_test:
        test = data / f"test-{args.max_test}.jsonl"
        if not test.is_file():
            lines = (data / "test.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
            test.write_text("".join(lines[: args.max_test]), encoding="utf-8")
    result = {"contender": contender, "seed": seed}
    for name, path in (("base", base), ("model", model)):
        meta = trainer_meta(rundir.latest_checkpoint(path))
        evals = [json.loads(line) for line in (path / rundir.METRICS).read_text(encoding="utf-8").splitlines()
                 if '"val_loss"' in line]
        result[f"{name}_val_loss"] = evals[-1]["val_loss"]
        result[f"{name}_steps"] = meta["step"]
        result[f"{name}_train_s"] = meta["train_time_s"]
    searches = {"greedy": 1} if contender == "decoder" else {"greedy": 1, "beam4": 4}
    for label, beams in searches.items():
        gen = evaluate(model, test, folder / f"eval-{label}.json", chat=contender == "decoder", beams=beams)
        g = gen["results"]["generate"]
        result[label] = {"chrf": g["chrf"], "bleu": g["bleu"], "eval_s": gen.get("eval_s"), "examples": g["examples"]}
    return result


def summarize(results: list[dict], contender: str, label: str, metric: str) -> dict:
    values = [r[label][metric] for r in results if r["contender"] == contender and label in r]
    return {"values": values, "mean": statistics.mean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="runs/s2s-vs-dec")
    ap.add_argument("--pretrain-minutes", type=float, default=2.0)
    ap.add_argument("--finetune-minutes", type=float, default=4.0)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--max-test", type=int, default=None, help="score only the first N test records")
    ap.add_argument("--contenders", nargs="+", default=list(ARCH), choices=list(ARCH))
    ap.add_argument("--seq2seq-set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="overrides of the encoder-decoder's fine-tuning (exploration; the table uses none)")
    ap.add_argument("--decoder-set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="overrides of the decoder's fine-tuning (exploration; the table uses none)")
    ap.add_argument("--json", default="bench/results/seq2seq_vs_decoder.json")
    args = ap.parse_args()
    root = Path(args.dir)
    app_dir = root / "app"
    if not (app_dir / "data" / "build.json").is_file():
        run_app(AppRequest(name="translation", out_dir=str(app_dir), data_only=True))
    data = app_dir / "data"
    results = []
    for seed in args.seeds:
        order = list(ARCH) if seed % 2 == 0 else list(reversed(ARCH))  # take turns going first
        order = [c for c in order if c in args.contenders]
        for contender in order:
            results.append(one(contender, seed, root, data, args))
            print(json.dumps(results[-1]), flush=True)
    summary = {
        "machine": {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version()},
        "pretrain_minutes": args.pretrain_minutes, "finetune_minutes": args.finetune_minutes,
        "seq2seq_set": args.seq2seq_set, "decoder_set": args.decoder_set,
        "max_test": args.max_test, "runs": results,
        "summary": {f"{c} {label}": {m: summarize(results, c, label, m) for m in ("chrf", "bleu")}
                    for c in args.contenders for label in (("greedy",) if c == "decoder" else ("greedy", "beam4"))}}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    for name, s in summary["summary"].items():
        print(f"{name}: chrF {s['chrf']['mean']:.2f} ± {s['chrf']['sd']:.2f}, BLEU {s['bleu']['mean']:.2f} ± "
              f"{s['bleu']['sd']:.2f}")
    print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
