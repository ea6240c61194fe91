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


TAG_KINDS = ("NAME", "OP", "NUMBER", "STRING", "COMMENT")
"""Python token types that tag words (NAME splits into KEYWORD and NAME)."""


def python_tagged_lines(module: str) -> list[dict]:
    """Token classification from real text: each line of a standard-library module's source as its Python tokens
    (``tokenize``) tagged with their type: NAME, KEYWORD, OP, NUMBER, STRING or COMMENT. Lines inside a token that
    spans lines (a docstring) are left out, so every record is one line's words."""
    import io
    import keyword
    import tokenize

    source = Path(importlib.import_module(module).__file__).read_text()
    lines: dict[int, list[tuple[str, str]]] = {}
    spanned: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        kind = tokenize.tok_name[tok.type]
        if tok.start[0] != tok.end[0]:
            spanned.update(range(tok.start[0], tok.end[0] + 1))
        elif kind in TAG_KINDS:
            tag = "KEYWORD" if kind == "NAME" and keyword.iskeyword(tok.string) else kind
            lines.setdefault(tok.start[0], []).append((tok.string, tag))
    return [{"tokens": [w for w, _ in words], "tags": [t for _, t in words]}
            for n, words in sorted(lines.items()) if n not in spanned]


def write_python_tags(folder: Path) -> tuple[Path, Path]:
    """Token classification (JSONL): train on argparse.py's lines, validate on textwrap.py's (code never seen)."""
    train_file, val_file = folder / "train.jsonl", folder / "val.jsonl"
    for path, module in ((train_file, "argparse"), (val_file, "textwrap")):
        path.write_text("".join(json.dumps(r) + "\n" for r in python_tagged_lines(module)))
    return train_file, val_file


def write_random_base(folder: Path, preset: str) -> Path:
    """A base run directory that costs no training: a freshly initialized 2-layer model of ``preset`` (bert-tiny: an
    encoder; gpt2-tiny: a decoder) with a 128-token context, over a character tokenizer of argparse.py and
    textwrap.py (with [CLS]/[SEP]/[MASK]/[PAD] for an encoder), written as a pretraining run."""
    import argparse
    import textwrap

    import torch

    from lmforge import rundir
    from lmforge.config import ModelConfig, TrainConfig, from_dict, save_yaml
    from lmforge.data.tokenizer import Tokenizer
    from lmforge.model import build_model
    from lmforge.training.checkpoint import save_weights_only

    tokenizer = Tokenizer.train_char([Path(m.__file__).read_text() for m in (argparse, textwrap)])
    model_cfg = from_dict(ModelConfig, {"preset": preset, "n_layer": 2, "block_size": 128})
    if model_cfg.arch == "encoder":
        tokenizer.encoder_tokens()  # adds them: the embedding needs their rows
    model_cfg.vocab_size = tokenizer.vocab_size
    torch.manual_seed(0)
    model = build_model(model_cfg)
    folder.mkdir(parents=True)
    save_yaml(TrainConfig(out_dir=str(folder), model=model_cfg), folder / rundir.CONFIG)
    tokenizer.save(folder / rundir.TOKENIZER)
    rundir.write_run_info(folder, "pretrain", "mlm" if model_cfg.arch == "encoder" else "lm")
    save_weights_only(folder, 0, model)
    return folder
