"""`lmforge sweep` on tinyshakespeare: MedianPruner against no pruning, and the best config against the recipe.

    python bench/sweep.py pruning [--trials 12] [--json OUT] [--dir DIR]
    python bench/sweep.py recipe [--trials 20] [--seeds 3] [--json OUT] [--dir DIR]

pruning: the same sweep (gpt2-tiny, character level, 200 steps evaluated every 25; lr, warmup and weight decay
searched; TPE seed 0; 4 startup trials) twice, ``pruner: median`` and ``pruner: none``: total steps trained, best
val loss, their ratios.

recipe: the same kind of sweep around the shipped ``shakespeare-fast`` recipe (its 500-step budget, evaluated
every 100 steps; lr, muon_lr, min_lr and warmup searched; MedianPruner), then its best config and the shipped
recipe, each trained with ``--seeds`` seeds (``train.seed``): mean ± sd of the final val loss.

All in this process, one after another, on tinyshakespeare (``../shared/data/tinyshakespeare.txt``); ``--dir``
reuses a folder, so a killed bench continues (its sweeps resume).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from lmforge.config import DataConfig, load_train_config
from lmforge.data.prepare import prepare
from lmforge.hardware import cpu_name
from lmforge.sweep import run_sweep
from lmforge.training.pretrain import train

SHAKESPEARE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tinyshakespeare.txt"
PRUNING_SPACE = {"optim.lr": {"type": "float", "low": 1e-4, "high": 3e-2, "log": True},
                 "optim.warmup_steps": {"type": "int", "low": 0, "high": 100},
                 "optim.weight_decay": {"type": "float", "low": 0.0, "high": 0.3}}
PRUNING_OVERRIDES = ["model.preset=gpt2-tiny", "model.n_layer=2", "model.block_size=64", "train.batch_size=16",
                     "train.max_steps=200", "train.eval_interval=25", "train.eval_batches=5",
                     "train.ckpt_interval=200", "optim.name=adamw"]
RECIPE_SPACE = {"optim.lr": {"type": "float", "low": 1e-3, "high": 2e-2, "log": True},
         "optim.muon_lr": {"type": "float", "low": 5e-3, "high": 0.1, "log": True},
         "optim.min_lr": {"type": "float", "low": 1e-4, "high": 2e-3, "log": True},
         "optim.warmup_steps": {"type": "int", "low": 0, "high": 100}}


def _sweep(tmp: Path, name: str, base: str, overrides: list[str], space: dict, trials: int, pruner: str):
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"base": base, "overrides": overrides, "trials": trials, "seed": 0,
                                    "startup_trials": 4, "pruner": pruner, "space": space}))
    t0 = time.perf_counter()
    st = run_sweep(str(path), out_dir=str(tmp / name), say=lambda *a, **k: None)
    done = [t for t in st.get_trials() if t.state.name in ("COMPLETE", "PRUNED")]
    summary = {"steps": sum(t.user_attrs["steps"] for t in done), "best": st.best_value,
               "best_params": st.best_params, "pruned": sum(t.state.name == "PRUNED" for t in done),
               "wall_s": time.perf_counter() - t0}
    print(name, json.dumps(summary), flush=True)
    return st, summary


def main() -> None:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["pruning", "recipe"])
    p.add_argument("--trials", type=int)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--json", type=Path)
    p.add_argument("--dir", type=Path, help="work here (a killed bench continues: the sweeps resume)")
    args = p.parse_args()
    tmp = args.dir or Path(tempfile.mkdtemp(prefix="lmforge-sweep-bench-"))
    dataset = tmp / "shakespeare"
    if not (dataset / "meta.json").is_file():
        prepare(DataConfig(sources=[str(SHAKESPEARE.resolve())], tokenizer="char", val_fraction=0.1), dataset,
                progress=False)
    common = [f"data.dataset_dir={dataset}", "train.device=cpu", "train.precision=fp32"]
    results: dict = {"machine": {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                                 "python": platform.python_version()}, "command": " ".join(sys.argv)}
    if args.what == "pruning":
        trials = args.trials or 12
        for pruner in ("median", "none"):
            _, results[pruner] = _sweep(tmp, pruner, "shakespeare-char", [*common, *PRUNING_OVERRIDES],
                                        PRUNING_SPACE, trials, pruner)
        results["steps_ratio"] = results["median"]["steps"] / results["none"]["steps"]
        results["best_ratio"] = results["median"]["best"] / results["none"]["best"]
    else:
        trials = args.trials or 20
        common.append("train.eval_interval=100")
        st, results["sweep"] = _sweep(tmp, "recipe", "shakespeare-fast", common, RECIPE_SPACE, trials, "median")
        best = [f"{k}={json.dumps(v)}" for k, v in st.best_params.items()]
        for name, extra in (("shipped", []), ("best", best)):
            losses = []
            for seed in range(1, args.seeds + 1):
                out = tmp / name / str(seed)
                shutil.rmtree(out, ignore_errors=True)
                cfg = load_train_config("shakespeare-fast", [*common, *extra, f"train.seed={seed}", f"out_dir={out}",
                                                             "sample.num_samples=0"])
                losses.append(train(cfg, progress=False).val_loss)
            results[name] = {"val_loss": losses, "mean": statistics.mean(losses),
                             "sd": statistics.stdev(losses) if len(losses) > 1 else 0.0}
            print(name, json.dumps(results[name]), flush=True)
    results["trials"] = trials
    text = json.dumps(results, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
