"""Fine-tuning quality on small tasks built from the standard library (issue 4's figures).

Pretrains a small character-level base (~10 s), then: SFT on 'Repeat: WORD' -> 'WORD' with held-out
words (exact match before/after; full fine-tuning and LoRA), and classification of 4-line source
snippets by module (val accuracy and macro-F1 against the majority class).

    python bench/finetune_quality.py [--steps 300]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmforge.config import load_finetune_config  # noqa: E402
from lmforge.finetuning.finetune import finetune  # noqa: E402
from tests.finetuning.tasks import train_base, write_module_snippets, write_repeat_task  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default="bench/results/finetune_quality.json")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = train_base(root)
        train_file, val_file = write_repeat_task(root)
        snippets = write_module_snippets(root)
        common = [f"base={base}", f"train.max_steps={args.steps}", "train.batch_size=16", "train.eval_interval=100"]
        runs = {
            "sft full": ["task=sft", f"data.train={train_file}", f"data.val={val_file}", "optim.lr=1e-3"],
            "sft packed": ["task=sft", f"data.train={train_file}", f"data.val={val_file}", "optim.lr=1e-3",
                           "data.packing=true"],
            "sft lora r16": ["task=sft", f"data.train={train_file}", f"data.val={val_file}", "optim.lr=3e-3",
                             "lora.rank=16", "lora.alpha=32"],
            "classify full": ["task=classify", f"data.train={snippets}", "optim.lr=1e-3"],
            "classify lora r16": ["task=classify", f"data.train={snippets}", "optim.lr=3e-3", "lora.rank=16",
                                  "lora.alpha=32"],
        }
        for name, extra in runs.items():
            t = time.perf_counter()
            result = finetune(load_finetune_config(None, [*common, *extra, f"out_dir={root / name.replace(' ', '_')}"]),
                              progress=False)
            records = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
            before = next((r for r in records if r["kind"] == "eval" and r["step"] == 0), {})
            m = result.metrics
            row = {"run": name, "wall_s": round(time.perf_counter() - t, 1), "val_loss": m["val_loss"],
                   "exact_match_before": before.get("exact_match"), "exact_match": m.get("exact_match"),
                   "accuracy": m.get("val_accuracy"), "macro_f1": m.get("val_macro_f1")}
            if "confusion_matrix" in m:
                counts = [sum(r) for r in m["confusion_matrix"]]
                row["majority_baseline"] = max(counts) / sum(counts)
            rows.append(row)
            print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
