"""Which recipe changes lower val bits-per-byte at equal wall time on the default corpus (issue 14).

Each experiment is the default recipe plus overrides, trained in its own process, either for the same
number of steps (``--steps``: free of this VM's ±15% speed noise, but a change that slows the step
must then win by more than it costs) or for the same time (``--budget MINUTES``: train.budget_minutes,
each run planning its own step count from its measured pace, as the main job does). The final val
bits/byte over the whole val split, the steps and the median step time are appended as one JSON line
to the results file (see BENCHMARKS.md, "A better default recipe").

    python bench/recipe_search.py --budget 3.5 --out recipe.jsonl \
        base: muon:optim.name=muon wsd:optim.name=muon,optim.schedule=wsd
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


def run_one(name: str, overrides: list[str], steps: int, budget: float | None, out: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        length = [f"train.max_steps={steps}", "train.budget_minutes=null"] if budget is None else \
            ["train.max_steps=100000", f"train.budget_minutes={budget}"]
        cmd = [sys.executable, "-m", "lmforge", "train", f"out_dir={run_dir}", *length, "train.eval_interval=100000",
               "train.ckpt_interval=100000", "train.max_minutes=null", "sample.num_samples=0", *overrides]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode:
            result = {"name": name, "overrides": overrides, "error": proc.stderr.strip().splitlines()[-1:]}
        else:
            records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            train = [r for r in records if r["kind"] == "train"]
            final = [r for r in records if r["kind"] == "eval"][-1]
            step_s = [r["time_s"] - q["time_s"] for q, r in zip(train[1:], train[2:], strict=False)]
            interval = train[2]["step"] - train[1]["step"]  # the first interval holds start-up
            result = {"name": name, "overrides": overrides, "steps": final["step"], "budget_minutes": budget,
                      "train_s": round(train[-1]["time_s"], 1), "val_bpb": round(final["val_bpb"], 4),
                      "val_loss": round(final["val_loss"], 4),
                      "median_step_s": round(statistics.median(step_s) / interval, 3),
                      "train_loss_last": round(train[-1]["loss"], 4), "wall_s": round(wall, 1)}
    with out.open("a") as f:
        f.write(json.dumps(result) + "\n")
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--budget", type=float, help="minutes of training per run instead of --steps")
    ap.add_argument("--out", type=Path, default=Path("recipe_search.jsonl"))
    ap.add_argument("experiments", nargs="+", help="NAME:key=value,key=value (NAME: alone is the recipe as is)")
    args = ap.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for spec in args.experiments:
        name, _, rest = spec.partition(":")
        run_one(name, [o for o in rest.split(",") if o], args.steps, args.budget, args.out)


if __name__ == "__main__":
    main()
