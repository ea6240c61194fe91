"""Training throughput of one process vs torchrun's processes on this machine, the same global batch.

    python bench/parallel_speed.py [--data ../shared/data/tinyshakespeare.txt] [--reps 3] [--steps 60] [KEY=VALUE ...]

Runs ``lmforge train`` (the default recipe's model, AdamW, fp32, character-level tinyshakespeare) as
``1x2``: one process with all the cores' threads, and ``ddp 2x1`` / ``fsdp 2x1``: ``--nproc 2`` (one
thread each on a 2-core machine), with a global batch of 16 sequences in every setup (1 process: 2
micro-batches of 8; 2 processes: 1 each). The setups alternate within each repetition, so a slower spell of
the VM hits all of them. Reported: the median training tokens/s of each run's log lines after the first
(which holds the warm-up), the median over the runs, each setup's ratio to ``1x2`` and the per-process bytes
of parameters + optimizer state the runs log.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from lmforge.hardware import cpu_name

SETUPS = {"1x2": [], "ddp 2x1": ["--nproc", "2", "parallel.strategy=ddp"],
          "fsdp 2x1": ["--nproc", "2", "parallel.strategy=fsdp"]}


def run(args: list[str], out: Path) -> dict:
    subprocess.run([sys.executable, "-m", "lmforge", "train", *args, f"out_dir={out}"], check=True,
                   stdout=subprocess.DEVNULL)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tps = [r["tokens_per_s"] for r in records if r["kind"] == "train"][1:]
    memory = next((r for r in records if r["kind"] == "memory"), {})
    return {"tokens_per_s": statistics.median(tps),
            "bytes_per_rank": memory.get("param_bytes_per_rank", 0) + memory.get("optimizer_bytes_per_rank", 0)}


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare.txt"))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("overrides", nargs="*", help="dotted overrides for every setup")
    args = ap.parse_args()
    common = ["optim.name=adamw", "train.precision=fp32", "train.device=cpu", "train.batch_size=8",
              "train.global_batch_size=16", f"train.max_steps={args.steps}", "train.budget_minutes=null",
              "train.log_interval=10", f"train.eval_interval={args.steps}", "train.eval_batches=1",
              f"train.ckpt_interval={args.steps}", "sample.num_samples=0", *args.overrides]
    runs: dict[str, list[dict]] = {name: [] for name in SETUPS}
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "data"
        subprocess.run([sys.executable, "-m", "lmforge", "prepare", args.data, "--out", str(prepared),
                        "--tokenizer", "char"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        data = [f"data.dataset_dir={prepared}", *common]
        for rep in range(args.reps):
            for name, extra in SETUPS.items():
                result = run([*data, *extra], Path(tmp) / f"{name.replace(' ', '-')}-{rep}")
                runs[name].append(result)
                print(f"{name:9s} rep {rep}: {result['tokens_per_s']:,.0f} tok/s", flush=True)
    base = statistics.median(r["tokens_per_s"] for r in runs["1x2"])
    ddp_bytes = runs["ddp 2x1"][0]["bytes_per_rank"]
    results = {"machine": f"{cpu_name()}, {os.cpu_count()} cores, {platform.machine()}",
               "command": "python bench/parallel_speed.py " + " ".join(sys.argv[1:]), "setups": []}
    for name, rs in runs.items():
        median = statistics.median(r["tokens_per_s"] for r in rs)
        results["setups"].append({"setup": name, "median_tokens_per_s": median, "ratio_to_1x2": median / base,
                                  "runs": [r["tokens_per_s"] for r in rs], "bytes_per_rank": rs[0]["bytes_per_rank"]})
        held = rs[0]["bytes_per_rank"]
        share = f", {held / ddp_bytes:.2f}x DDP's bytes per process" if held else ""
        print(f"{name:9s} median {median:,.0f} tok/s = {median / base:.2f}x 1x2{share}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
