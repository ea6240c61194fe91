"""An encoder (BERT) against the decoder for classification, at equal wall time, for BENCHMARKS.md.

    python bench/encoder_vs_decoder.py [--dir runs/enc-vs-dec] [--pretrain-minutes 3] [--finetune-minutes 1.5]
                                       [--seeds 0 1 2] [--json bench/results/encoder_vs_decoder.json]

Three bases pretrained for the same time on the same data (the default corpus with its BPE vocabulary): the default
recipe as it is (the decoder, Llama-style 4x4x256); the same recipe with ``model.preset=bert-mini`` (an encoder of the
same size, 4x4x256, BERT's shape: post-norm, learned positions, a pooler, a 128-token context); and the same recipe
with ``model.arch=encoder`` (the default model's own shape as an encoder: pre-norm, RoPE, RMSNorm, SwiGLU, 256
tokens); the encoders trained by masked-LM (15%). Each is then fine-tuned (``task=classify``) for the same time on
two tasks, per seed:

* ``tour``: the README tour's ``modules.csv`` (4-line code snippets -> which of 4 stdlib modules, 720 texts), its
  last 20% held out;
* ``packages``: 4-line code snippets -> which of 8 stdlib packages (asyncio, email, json, xml, unittest, http,
  multiprocessing, concurrent), ~2,400 texts, up to 300 a class, 20% held out (by a hash of the text: the same
  split every run).

The held-out part is the fine-tuning's ``data.val``, scored at the end (the last weights; no early stopping, no
selection). Accuracy and macro-F1, mean and standard deviation over the seeds. A finished fine-tuning run (its
final_eval.json) is read, not run again, so a killed bench continues where it stopped.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import platform
import statistics
import sys
import sysconfig
from pathlib import Path

import torch

from lmforge.config import load_finetune_config, load_train_config
from lmforge.examples import write_examples
from lmforge.finetuning.finetune import finetune
from lmforge.hardware import cpu_name
from lmforge.training.pretrain import train

PACKAGES = ("asyncio", "email", "json", "xml", "unittest", "http", "multiprocessing", "concurrent")
PER_CLASS = 300
BASES = {"decoder": [], "bert-mini": ["model.preset=bert-mini"], "encoder": ["model.arch=encoder"]}


def _held_out(text: str) -> bool:
    return int(hashlib.sha256(text.encode()).hexdigest(), 16) % 5 == 0


def _write(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=("text", "label"))
        writer.writeheader()
        writer.writerows(rows)


def packages_task(folder: Path) -> tuple[Path, Path]:
    """4-line snippets of each package's source files (sorted, every 4 non-blank lines), PER_CLASS a class."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    train_rows, val_rows = [], []
    for package in PACKAGES:
        root = stdlib / package
        files = sorted(p for p in (root.rglob("*.py") if root.is_dir() else [root.with_suffix(".py")])
                       if "test" not in p.parts[len(stdlib.parts):-1])
        rows: list[dict] = []
        for path in files:
            lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
            rows += [{"text": "\n".join(lines[i:i + 4]), "label": package} for i in range(0, len(lines) - 4, 4)]
        step = max(1, len(rows) // PER_CLASS)
        for row in rows[::step][:PER_CLASS]:
            (val_rows if _held_out(row["text"]) else train_rows).append(row)
    folder.mkdir(parents=True, exist_ok=True)
    _write(folder / "packages-train.csv", train_rows)
    _write(folder / "packages-val.csv", val_rows)
    return folder / "packages-train.csv", folder / "packages-val.csv"


def tour_task(folder: Path) -> tuple[Path, Path]:
    """The tour's modules.csv, its last 20% held out."""
    if not (folder / "tour" / "modules.csv").is_file():
        write_examples(folder / "tour")
    with open(folder / "tour" / "modules.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    cut = len(rows) * 4 // 5
    _write(folder / "tour-train.csv", rows[:cut])
    _write(folder / "tour-val.csv", rows[cut:])
    return folder / "tour-train.csv", folder / "tour-val.csv"


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="runs/enc-vs-dec")
    ap.add_argument("--pretrain-minutes", type=float, default=3.0)
    ap.add_argument("--finetune-minutes", type=float, default=1.5)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--json", default="bench/results/encoder_vs_decoder.json")
    args = ap.parse_args()
    root = Path(args.dir)
    tasks = {"tour": tour_task(root / "tasks"), "packages": packages_task(root / "tasks")}
    out: dict = {"machine": {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                             "python": platform.python_version()},
                 "pretrain_minutes": args.pretrain_minutes, "finetune_minutes": args.finetune_minutes,
                 "bases": {}, "tasks": {}}
    for name, overrides in BASES.items():
        run = root / f"base-{name}"
        if not (run / "checkpoints" / "latest").exists():
            train(load_train_config("default", [*overrides, f"out_dir={run}", "sample.num_samples=0",
                                                f"train.budget_minutes={args.pretrain_minutes}"]))
        evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        final = [r for r in evals if r["kind"] == "eval"][-1]
        out["bases"][name] = {"run": str(run), "steps": final["step"], **{k: v for k, v in final.items()
                                                                          if k.startswith("val_")}}
    for task, (train_csv, val_csv) in tasks.items():
        out["tasks"][task] = {}
        for name in BASES:
            scores = []
            for seed in args.seeds:
                run = root / f"{task}-{name}-seed{seed}"
                if not (run / "final_eval.json").is_file():
                    finetune(load_finetune_config(None, [
                        "task=classify", f"base={root / f'base-{name}'}", f"data.train={train_csv}",
                        f"data.val={val_csv}", f"train.seed={seed}", f"out_dir={run}", "train.max_steps=100000",
                        f"train.budget_minutes={args.finetune_minutes}", "train.eval_interval=100000"]))
                final = json.loads((run / "final_eval.json").read_text())
                scores.append({"seed": seed, "accuracy": final["val_accuracy"], "macro_f1": final["val_macro_f1"]})
            summary = {k: {"mean": statistics.mean(s[k] for s in scores), "sd": statistics.stdev(s[k] for s in scores)
                           if len(scores) > 1 else 0.0} for k in ("accuracy", "macro_f1")}
            out["tasks"][task][name] = {"runs": scores, **summary}
            print(f"{task} {name}: accuracy {summary['accuracy']['mean']:.3f} ± {summary['accuracy']['sd']:.3f} | "
                  f"macro-F1 {summary['macro_f1']['mean']:.3f} ± {summary['macro_f1']['sd']:.3f}", flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
