"""The three applications (`lmforge app`) with several fine-tuning seeds: the main metric's mean ± sd beside
the strongest baseline, for BENCHMARKS.md and the README's table.

    python bench/apps.py [--apps translation summarization qa] [--seeds 0 1 2] [--dir runs/apps-bench]
                         [--json bench/results/apps.json]

Each (app, seed) is one ordinary recipe run, ``lmforge app NAME --seed S --out DIR/NAME-seedS``: each app pretrains
its own base in it (seeded by S too). A finished run (its results.json) is read, not run again, so a killed bench
continues where it stopped; the JSON keeps the entries of apps not named this time.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

from lmforge.apps.recipe import APPS, AppRequest, run_app, summarize_seeds
from lmforge.hardware import cpu_name


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--apps", nargs="+", default=list(APPS), choices=list(APPS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--dir", default="runs/apps-bench")
    ap.add_argument("--json", default="bench/results/apps.json")
    args = ap.parse_args()
    json_path = Path(args.json)
    summary = json.loads(json_path.read_text()) if json_path.is_file() else {"apps": {}}  # other apps' entries are kept
    machine = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "python": platform.python_version()}
    summary["machine"] = machine  # this run's; each app keeps the machine it was measured on
    for name in args.apps:
        runs = []
        for seed in args.seeds:
            out = Path(args.dir) / f"{name}-seed{seed}"
            if (out / "results.json").is_file():
                runs.append(json.loads((out / "results.json").read_text()))
            else:
                runs.append(run_app(AppRequest(name=name, seed=seed, out_dir=str(out))))
        s = summarize_seeds(runs)
        s.update(baselines=runs[0]["baselines"], models=[r["model"] for r in runs],
                 searches=[r.get("searches") for r in runs], breakdown=[r.get("breakdown") for r in runs],
                 minutes=[r["total_s"] / 60 for r in runs], test_records=runs[0]["test_records"],
                 train_records=runs[0]["train_records"], steps=[r["finetune_steps"] for r in runs],
                 base_steps=[r.get("base_steps") for r in runs], search=[r.get("search") for r in runs],
                 memory=[r.get("memory") for r in runs], machine=machine)
        summary["apps"][name] = s
        print(f"{name}: {s['metric']} {s['mean']:.2f} ± {s['sd']:.2f} over seeds {s['seeds']} | bar "
              f"{s['bar']['baseline']} {s['bar']['value']:.2f} | {max(s['minutes']):.1f} min at most", flush=True)
        for part, p in s.get("parts", {}).items():
            print(f"  {part} ({p['examples']} test records): {p['mean']:.2f} ± {p['sd']:.2f} | bar "
                  f"{p['bar']['baseline']} {p['bar']['value']:.2f}", flush=True)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
