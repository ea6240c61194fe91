"""Which recipe changes lower val bits-per-byte at equal wall time on the default corpus (issue 14).

Each experiment is the default recipe plus overrides, trained in its own process for the same
number of steps (a fixed step count keeps the comparison free of this VM's ±15% speed noise); the
final val bits/byte over the whole val split and the median step time are appended as one JSON line
to the results file. Equal-time conclusions combine the two: a change must lower bits/byte by more
than its extra step time costs (see BENCHMARKS.md, "A better default recipe").

    python bench/recipe_search.py --steps 250 --out bench_results/recipe.jsonl \
        base: muon:optim.name=muon wsd:optim.schedule=wsd,optim.decay_fraction=0.4
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_one(name: str, overrides: list[str], steps: int, out: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "lmforge", "train", f"out_dir={run_dir}", f"train.max_steps={steps}",
               f"train.eval_interval={steps}", f"train.ckpt_interval={steps}", "train.max_minutes=null",
               "sample.num_samples=0", *overrides]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode:
            result = {"name": name, "overrides": overrides, "error": proc.stderr.strip().splitlines()[-1:]}
        else:
            records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            train = [r for r in records if r["kind"] == "train"]
            final = [r for r in records if r["kind"] == "eval"][-1]
            step_s = [4096 / r["tokens_per_s"] for r in train[1:]]  # the first interval holds start-up
            result = {"name": name, "overrides": overrides, "steps": steps, "val_bpb": round(final["val_bpb"], 4),
                      "val_loss": round(final["val_loss"], 4), "median_step_s": round(statistics.median(step_s), 3),
                      "train_loss_last": round(train[-1]["loss"], 4), "wall_s": round(wall, 1)}
    with out.open("a") as f:
        f.write(json.dumps(result) + "\n")
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--out", type=Path, default=Path("recipe_search.jsonl"))
    ap.add_argument("experiments", nargs="+", help="NAME:key=value,key=value (NAME: alone is the recipe as is)")
    args = ap.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for spec in args.experiments:
        name, _, rest = spec.partition(":")
        run_one(name, [o for o in rest.split(",") if o], args.steps, args.out)


if __name__ == "__main__":
    main()
