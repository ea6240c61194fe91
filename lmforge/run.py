"""A run directory on disk, and loading a trained model from it for inference.

Accepted paths: a run directory (its latest checkpoint is used) or one checkpoint directory inside
``RUN/checkpoints/``. The run's ``config.yaml`` and ``tokenizer.json`` describe the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.config import TrainConfig, load_train_config
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError
from lmforge.model.gpt import GPT
from lmforge.train.checkpoint import CKPT_DIR, latest_checkpoint, load_weights


@dataclass
class LoadedRun:
    model: GPT
    tokenizer: Tokenizer
    config: TrainConfig
    checkpoint: Path


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """(run_dir, checkpoint_dir) for a run directory or a checkpoint directory."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"'{p}' does not exist (expected a run directory or a checkpoint directory)")
    if (p / "model.safetensors").is_file() and p.parent.name == CKPT_DIR:
        return p.parent.parent, p
    if (p / "config.yaml").is_file():
        ckpt = latest_checkpoint(p)
        if ckpt is None:
            raise UserError(f"run directory '{p}' has no checkpoint yet")
        return p, ckpt
    raise UserError(f"'{p}' is not a run directory (no config.yaml) nor a checkpoint (no model.safetensors)")


def load_run(path: str | Path, device: str | torch.device = "cpu") -> LoadedRun:
    """Model (eval mode), tokenizer and config of a run or checkpoint, ready to generate.

    A Hugging Face ``save_pretrained`` folder (config.json + safetensors + tokenizer.json) is
    accepted too and converted in memory.
    """
    from lmforge.interop import is_hf_folder, load_hf

    if is_hf_folder(path):
        model, tokenizer = load_hf(path)
        if tokenizer is None:
            raise UserError(f"'{path}' has no tokenizer.json (lmforge needs the fast-tokenizer file)")
        return LoadedRun(model=model.to(device), tokenizer=tokenizer, config=TrainConfig(model=model.cfg),
                         checkpoint=Path(path))
    run_dir, ckpt = resolve_checkpoint(path)
    cfg = load_train_config(run_dir / "config.yaml")
    tokenizer = Tokenizer.from_file(run_dir / "tokenizer.json")
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise UserError(f"tokenizer '{run_dir / 'tokenizer.json'}' has {tokenizer.vocab_size} tokens but the "
                        f"model's vocabulary has {cfg.model.vocab_size}: they do not belong together")
    model = GPT(cfg.model)
    load_weights(model, ckpt)
    model.to(device).eval()
    return LoadedRun(model=model, tokenizer=tokenizer, config=cfg, checkpoint=ckpt)
