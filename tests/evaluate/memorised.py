"""A model trained to memorise a few facts, and multiple-choice files about them."""

from __future__ import annotations

import json
import random
from pathlib import Path

from lmforge.config import load_train_config
from lmforge.training.pretrain import train

FACTS = {"alpha": "red", "bravo": "green", "charlie": "blue", "delta": "yellow", "echo": "purple", "foxtrot": "red",
         "golf": "blue", "hotel": "green", "india": "purple", "juliet": "yellow", "kilo": "blue", "lima": "red"}
COLORS = ["red", "green", "blue", "yellow", "purple"]


def train_memorised(folder: Path) -> tuple[Path, Path]:
    """A model trained to memorise FACTS, and a multiple-choice file about them (and one always wrong)."""
    rng = random.Random(0)
    lines = [f"the color of {n} is {c}." for n, c in FACTS.items()]
    text = ""
    for _ in range(80):
        rng.shuffle(lines)
        text += "\n".join(lines) + "\n"
    (folder / "facts.txt").write_text(text)
    result = train(load_train_config(None, [f"data.sources=[{folder / 'facts.txt'}]", "data.tokenizer=char",
                                            f"out_dir={folder / 'run'}", "model.preset=gpt2-tiny", "model.n_layer=2",
                                            "model.block_size=64", "train.batch_size=16", "train.max_steps=300",
                                            "train.eval_interval=300", "optim.lr=3e-3", "optim.warmup_steps=10",
                                            "sample.num_samples=0"]), progress=False)
    records = []
    for name, color in FACTS.items():
        choices = [color] + [c for c in COLORS if c != color][:2]
        rng.shuffle(choices)
        records.append({"context": f"the color of {name} is", "choices": [" " + c for c in choices],
                        "label": choices.index(color)})
    (folder / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    shuffled = [{**r, "label": (r["label"] + 1 + i % 2) % 3} for i, r in enumerate(records)]  # always wrong
    (folder / "mc_shuffled.jsonl").write_text("".join(json.dumps(r) + "\n" for r in shuffled))
    return result.run_dir, folder
