"""Time-to-loss on tinyshakespeare (character level): lmforge's shipped CPU recipe vs nanoGPT's.

    python bench/time_to_loss.py [--data ../shared/data/tinyshakespeare.txt] [--target 1.88] [--reps 1] [KEY=VALUE ...]

Trains ``shakespeare-fast`` (the recipe tuned for time-to-loss) and ``shakespeare-char``
(nanoGPT's published CPU recipe: 4x4x128, context 64, batch 12, 2000 steps, lr 1e-3) on the same
prepared data, in the same process, and reports for each the training wall time (start of the
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
from lmforge.training.loop import train

RECIPES = ("shakespeare-fast", "shakespeare-char")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare.txt"))
    ap.add_argument("--target", type=float, default=1.88)
    ap.add_argument("--reps", type=int, default=1, help="runs per recipe (seeds 1337, 1338, ...)")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("overrides", nargs="*", help="dotted overrides for every recipe, e.g. train.max_steps=1200")
    args = ap.parse_args()

    keep_freed_memory()  # as `lmforge train` does
    compile_falls_back_to_eager()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        prep_cfg = load_train_config(RECIPES[0], [f"data.sources=[{args.data}]"]).data
        prepare(prep_cfg, data_dir, progress=False)
        for recipe in args.recipes.split(","):
            runs = []
            for rep in range(args.reps):
                cfg = load_train_config(recipe, [f"data.dataset_dir={data_dir}", f"out_dir={tmp}/{recipe}-{rep}",
                                                 "sample.num_samples=0", f"train.seed={1337 + rep}", *args.overrides])
                r = train(cfg, progress=False)
                runs.append({"seed": 1337 + rep, "val_loss": r.val_loss, "train_s": r.train_time_s})
                print(f"{recipe:22s} seed {1337 + rep}: val loss {r.val_loss:.4f} in {r.train_time_s:.1f} s "
                      f"({'reached' if r.val_loss <= args.target else 'missed'} {args.target})", flush=True)
            results.append({"recipe": recipe, "steps": cfg.train.max_steps, "runs": runs,
                            "median_train_s": statistics.median(x["train_s"] for x in runs),
                            "median_val_loss": statistics.median(x["val_loss"] for x in runs)})
    base = results[-1]["median_train_s"]
    for r in results:
        print(f"{r['recipe']:22s} median {r['median_train_s']:6.1f} s, val loss {r['median_val_loss']:.4f}, "
              f"time ratio to {results[-1]['recipe']}: {r['median_train_s'] / base:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"target": args.target, "results": results}, indent=1))


if __name__ == "__main__":
    main()
