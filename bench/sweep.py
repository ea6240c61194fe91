"""`lmforge sweep` on tinyshakespeare: MedianPruner against no pruning, and the best config against the recipe.

    python bench/sweep.py [--trials 20] [--seeds 3] [--json bench/results/sweep.json]

1. The same sweep around the shipped ``shakespeare-fast`` recipe (its 500-step budget, evaluated every 100 steps;
   lr, muon_lr, min_lr and warmup searched; TPE seed 0) twice: ``pruner: median`` and ``pruner: none``. Reported:
   total steps trained, best val loss, their ratios.
2. The best config of the pruned sweep and the shipped recipe, each trained with ``--seeds`` seeds
   (``train.seed``): mean ± sd of the final val loss.
All in this process, one after another, on tinyshakespeare (``../shared/data/tinyshakespeare.txt``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml

from lmforge.config import DataConfig, load_train_config
from lmforge.data.prepare import prepare
from lmforge.hardware import cpu_name
from lmforge.sweep import run_sweep
from lmforge.training.loop import train

SHAKESPEARE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tinyshakespeare.txt"
SPACE = {"optim.lr": {"type": "float", "low": 1e-3, "high": 2e-2, "log": True},
         "optim.muon_lr": {"type": "float", "low": 5e-3, "high": 0.1, "log": True},
         "optim.min_lr": {"type": "float", "low": 1e-4, "high": 2e-3, "log": True},
         "optim.warmup_steps": {"type": "int", "low": 0, "high": 100}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lmforge-sweep-bench-"))
    dataset = tmp / "shakespeare"
    prepare(DataConfig(sources=[str(SHAKESPEARE.resolve())], tokenizer="char", val_fraction=0.1), dataset,
            progress=False)
    common = [f"data.dataset_dir={dataset}", "train.eval_interval=100", "train.device=cpu", "train.precision=fp32"]
    results: dict = {"machine": {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                                 "python": platform.python_version()}, "trials": args.trials}
    studies = {}
    for pruner in ("median", "none"):
        path = tmp / f"{pruner}.yaml"
        path.write_text(yaml.safe_dump({"base": "shakespeare-fast", "overrides": common, "trials": args.trials,
                                        "seed": 0, "startup_trials": 5, "pruner": pruner, "space": SPACE}))
        t0 = time.perf_counter()
        st = run_sweep(str(path), out_dir=str(tmp / pruner), say=lambda *a, **k: None)
        studies[pruner] = st
        done = [t for t in st.get_trials() if t.state.name in ("COMPLETE", "PRUNED")]
        results[pruner] = {"steps": sum(t.user_attrs["steps"] for t in done), "best": st.best_value,
                           "best_params": st.best_params, "pruned": sum(t.state.name == "PRUNED" for t in done),
                           "wall_s": time.perf_counter() - t0}
        print(pruner, json.dumps(results[pruner]), flush=True)
    results["steps_ratio"] = results["median"]["steps"] / results["none"]["steps"]
    results["best_ratio"] = results["median"]["best"] / results["none"]["best"]
    best = [f"{k}={json.dumps(v)}" for k, v in studies["median"].best_params.items()]
    for name, extra in (("shipped", []), ("best", best)):
        losses = []
        for seed in range(1, args.seeds + 1):
            cfg = load_train_config("shakespeare-fast", [*common, *extra, f"train.seed={seed}",
                                                         f"out_dir={tmp / name / str(seed)}", "sample.num_samples=0"])
            losses.append(train(cfg, progress=False).val_loss)
        results[name] = {"val_loss": losses, "mean": statistics.mean(losses),
                         "sd": statistics.stdev(losses) if len(losses) > 1 else 0.0}
        print(name, json.dumps(results[name]), flush=True)
    text = json.dumps(results, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
