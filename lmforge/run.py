"""A run directory on disk, and loading a trained model from it for inference.

Accepted paths: a run directory (its latest checkpoint is used) or one checkpoint directory inside
``RUN/checkpoints/``. The run's ``config.yaml`` and ``tokenizer.json`` describe the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.config import FinetuneConfig, TrainConfig, from_dict, is_finetune_config, load_train_config, load_yaml
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError
from lmforge.model.gpt import GPT
from lmforge.train.checkpoint import CKPT_DIR, has_weights, latest_checkpoint, load_weights


@dataclass
class LoadedRun:
    model: torch.nn.Module
    """A :class:`GPT`, or for a classification run a ``SequenceClassifier``."""
    tokenizer: Tokenizer
    config: TrainConfig | FinetuneConfig
    checkpoint: Path
    task: str = "lm"
    """'lm' (pretrained or SFT: generates text) or 'classify'."""
    labels: list[str] | None = None
    """Class names of a classification run, in class-id order."""

    @property
    def folder(self) -> Path:
        """The run directory, or the Hugging Face folder: where its chat template and labels live."""
        return self.checkpoint.parent.parent if self.checkpoint.parent.name == CKPT_DIR else self.checkpoint


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """(run_dir, checkpoint_dir) for a run directory or a checkpoint directory."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"'{p}' does not exist (expected a run directory or a checkpoint directory)")
    if has_weights(p) and p.parent.name == CKPT_DIR:
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
    data = load_yaml(run_dir / "config.yaml")
    if is_finetune_config(data):
        run = _load_finetuned(run_dir, ckpt)
        run.model.to(device).eval()
        return run
    cfg = load_train_config(run_dir / "config.yaml")
    tokenizer = _run_tokenizer(run_dir, cfg.model.vocab_size)
    model = GPT(cfg.model)
    load_weights(model, ckpt)
    model.to(device).eval()
    return LoadedRun(model=model, tokenizer=tokenizer, config=cfg, checkpoint=ckpt)


def _run_tokenizer(run_dir: Path, vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer.from_file(run_dir / "tokenizer.json")
    if tokenizer.vocab_size > vocab_size:
        raise UserError(f"tokenizer '{run_dir / 'tokenizer.json'}' has {tokenizer.vocab_size} tokens but the "
                        f"model's vocabulary has {vocab_size}: they do not belong together")
    return tokenizer


def _load_finetuned(run_dir: Path, ckpt: Path) -> LoadedRun:
    """A fine-tuned model: full weights, or LoRA adapters merged into the base model's weights."""
    from lmforge.finetune.classify import SequenceClassifier, load_labels
    from lmforge.finetune.lora import ADAPTER_FILE, apply_lora, load_adapter, merge

    cfg = from_dict(FinetuneConfig, load_yaml(run_dir / "config.yaml"))
    tokenizer = _run_tokenizer(run_dir, cfg.model.vocab_size)
    labels = load_labels(run_dir) if cfg.task == "classify" else None
    full = (ckpt / "model.safetensors").is_file()
    backbone = GPT(cfg.model) if full else load_run(cfg.base).model
    model = backbone if labels is None else SequenceClassifier(backbone, len(labels))
    if full:
        load_weights(model, ckpt)
    else:
        model = apply_lora(model, cfg.lora, ["score"] if labels is not None else None)
        load_adapter(model, ckpt / ADAPTER_FILE)
        model = merge(model)
    return LoadedRun(model=model, tokenizer=tokenizer, config=cfg, checkpoint=ckpt,
                     task="classify" if labels is not None else "lm", labels=labels)
