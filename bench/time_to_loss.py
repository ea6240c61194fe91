"""Time-to-loss on tinyshakespeare (character level): the shipped CPU recipe vs its issue-13 version and nanoGPT's.

    python bench/time_to_loss.py [--data ../shared/data/tinyshakespeare.txt] [--target 1.88] [--reps 1] [KEY=VALUE ...]

Trains ``shakespeare-fast`` (the recipe tuned for time-to-loss), ``bench/recipes/shakespeare-fast-issue13.yaml``
(that recipe as it was before issue 14: AdamW, 1100 steps) and ``shakespeare-char`` (nanoGPT's published
CPU recipe: 4x4x128, context 64, batch 12, 2000 steps, lr 1e-3) on the same prepared data, in the same
process, alternating recipes within each seed, and reports for each the training wall time (start of the
first step to the end of the final evaluation, over the whole val split) and the final val loss.
The process makes the same process-wide settings as ``lmforge train`` (malloc keeps freed memory).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from lmforge.config import load_train_config
from lmforge.data.prepare import prepare
from lmforge.runtime import compile_falls_back_to_eager, keep_freed_memory
from lmforge.training.pretrain import train

RECIPES = ("shakespeare-fast", str(Path(__file__).parent / "recipes" / "shakespeare-fast-issue13.yaml"),
           "shakespeare-char")


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare.txt"))
    ap.add_argument("--target", type=float, default=1.88)
    ap.add_argument("--reps", type=int, default=1, help="runs per recipe (seeds 1337, 1338, ...)")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("overrides", nargs="*", help="dotted overrides for every recipe, e.g. train.max_steps=1200")
    args = ap.parse_args()

    keep_freed_memory()  # as `lmforge train` does
    compile_falls_back_to_eager()
    recipes = args.recipes.split(",")
    names = [Path(r).stem for r in recipes]
    runs: dict[str, list[dict]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        prep_cfg = load_train_config(RECIPES[0], [f"data.sources=[{args.data}]"]).data
        prepare(prep_cfg, data_dir, progress=False)
        steps = {}
        for rep in range(args.reps):  # the recipes alternate: a slower spell of the VM hits all of them
            for recipe, name in zip(recipes, names, strict=True):
                cfg = load_train_config(recipe, [f"data.dataset_dir={data_dir}", f"out_dir={tmp}/{name}-{rep}",
                                                 "sample.num_samples=0", f"train.seed={1337 + rep}", *args.overrides])
                r = train(cfg, progress=False)
                steps[name] = cfg.train.max_steps
                runs[name].append({"seed": 1337 + rep, "val_loss": r.val_loss, "train_s": r.train_time_s})
                print(f"{name:26s} seed {1337 + rep}: val loss {r.val_loss:.4f} in {r.train_time_s:.1f} s "
                      f"({'reached' if r.val_loss <= args.target else 'missed'} {args.target})", flush=True)
    results = [{"recipe": name, "steps": steps[name], "runs": runs[name],
                "median_train_s": statistics.median(x["train_s"] for x in runs[name]),
                "median_val_loss": statistics.median(x["val_loss"] for x in runs[name])} for name in names]
    base = results[min(1, len(results) - 1)]  # the issue-13 recipe, where it ran
    for r in results:
        print(f"{r['recipe']:26s} median {r['median_train_s']:6.1f} s, val loss {r['median_val_loss']:.4f}, "
              f"time ratio to {base['recipe']}: {r['median_train_s'] / base['median_train_s']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"target": args.target, "results": results}, indent=1))


if __name__ == "__main__":
    main()
