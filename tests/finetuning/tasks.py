"""Small fine-tuning tasks built from real text (the standard library), for tests and bench/."""

from __future__ import annotations

import csv
import importlib
import json
import random
from pathlib import Path

BASE_ARGS = ["data.tokenizer=char", "model.preset=gpt2-tiny", "model.n_layer=2", "model.block_size=64",
             "train.batch_size=16", "train.max_steps=150", "train.log_interval=50", "train.eval_interval=150",
             "train.eval_batches=2", "optim.lr=3e-3", "optim.warmup_steps=10", "sample.num_samples=0"]
"""A small character-level base model, pretrained in ~10 s on argparse.py and textwrap.py."""


def train_base(folder: Path) -> Path:
    """Pretrain the base model into ``folder/base``; returns the run directory."""
    import argparse
    import textwrap

    from lmforge.config import load_train_config
    from lmforge.training.pretrain import train

    corpus = folder / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for mod in (argparse, textwrap):
        (corpus / Path(mod.__file__).name).write_text(Path(mod.__file__).read_text())
    out = folder / "base"
    train(load_train_config(None, [f"data.sources=[{corpus}]", f"out_dir={out}", *BASE_ARGS]), progress=False)
    return out


def _words() -> list[str]:
    import argparse

    words = sorted({w for w in Path(argparse.__file__).read_text().split()
                    if w.isalpha() and w.islower() and 3 <= len(w) <= 6})
    random.Random(0).shuffle(words)
    return words


def write_repeat_task(folder: Path) -> tuple[Path, Path]:
    """SFT examples 'Repeat: WORD' -> 'WORD' (JSONL); the 50 val words never occur in training."""
    words = _words()
    train_file, val_file = folder / "train.jsonl", folder / "val.jsonl"
    train_file.write_text("".join(json.dumps({"prompt": f"Repeat: {w}", "response": w}) + "\n"
                                  for w in words[:250] * 2))
    val_file.write_text("".join(json.dumps({"prompt": f"Repeat: {w}", "response": w}) + "\n"
                                for w in words[250:300]))
    return train_file, val_file


def write_module_snippets(folder: Path) -> Path:
    """Classification (CSV): which standard-library module a 4-line snippet of source comes from."""
    rows = []
    for name in ("argparse", "calendar", "tarfile", "difflib"):
        lines = [line for line in Path(importlib.import_module(name).__file__).read_text().splitlines() if line.strip()]
        rows += [{"text": "\n".join(lines[i:i + 4]), "label": name} for i in range(0, len(lines) - 4, 4)]
    random.Random(0).shuffle(rows)
    path = folder / "snippets.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, ["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return path
