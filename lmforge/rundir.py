"""The run directory: its layout, its ``run.json``, and every question about a run on disk.

A run directory is what ``lmforge train``, ``lmforge finetune`` and ``lmforge import`` write::

    run/
      run.json                      what this run is: kind, task, lora, lmforge version, created
      config.yaml                   the full resolved config (TrainConfig, or FinetuneConfig)
      tokenizer.json                the tokenizer, so a run is self-contained
      dataset_meta.json             pretraining: the prepared dataset's meta.json
      labels.json                   classification: class names in class-id order
      tokenizer_config.json         chat template (SFT runs, imported chat models)
      metrics.jsonl, tb/, loss.png  what the run reported
      final_eval.json               fine-tuning: the final evaluation
      checkpoints/
        step_000500/
          model.safetensors         full weights (no pickle), or
          adapter.safetensors       LoRA: only the trained tensors
          trainer.safetensors       optimizer moments + RNG states
          trainer.json              step, optimizer hyper-parameters, best val loss, ...
        latest                      names the newest complete checkpoint

Code decides what a run is from ``run.json`` (:func:`read_run_info`), never from which keys or files
happen to be present. Runs written before ``run.json`` existed are recognised once, by
:func:`infer_run_info`.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import yaml

from lmforge import __version__
from lmforge.errors import UserError

RUN_INFO = "run.json"
CONFIG = "config.yaml"
TOKENIZER = "tokenizer.json"
DATASET_META = "dataset_meta.json"
LABELS = "labels.json"
METRICS = "metrics.jsonl"
FINAL_EVAL = "final_eval.json"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
WEIGHTS = "model.safetensors"
ADAPTER = "adapter.safetensors"
TRAINER_TENSORS = "trainer.safetensors"
TRAINER_STATE = "trainer.json"

Kind = Literal["pretrain", "finetune", "imported"]
Task = Literal["lm", "sft", "classify"]


@dataclass(frozen=True)
class RunInfo:
    """The contents of ``run.json``."""

    kind: Kind
    """pretrain (``lmforge train``), finetune (``lmforge finetune``) or imported (``lmforge import``)."""
    task: Task
    """What the model was trained for: lm (next token), sft (chat answers) or classify (a label head)."""
    lora: bool = False
    """Whether checkpoints hold LoRA adapters (the base model's weights are read from the base run)."""
    version: str = __version__
    """The lmforge version that created the run."""
    created: str = ""
    """When the run was created (local time, ISO 8601)."""


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``path`` through a temporary file and a rename: readers see the old or the new text."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_run_info(run_dir: Path, kind: Kind, task: Task, lora: bool = False) -> RunInfo:
    """Create ``run.json`` for a new run."""
    info = RunInfo(kind=kind, task=task, lora=lora, created=time.strftime("%Y-%m-%dT%H:%M:%S"))
    write_text_atomic(Path(run_dir) / RUN_INFO, json.dumps(asdict(info), indent=1) + "\n")
    return info


def read_run_info(run_dir: Path) -> RunInfo:
    """What the run in ``run_dir`` is: from its ``run.json``, or inferred for an older run."""
    path = Path(run_dir) / RUN_INFO
    if not path.is_file():
        return infer_run_info(run_dir)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return RunInfo(**data)
    except (ValueError, TypeError) as e:
        raise UserError(f"'{path}' is not a valid run.json ({e})") from None


def infer_run_info(run_dir: Path) -> RunInfo:
    """The one place that recognises a run written before ``run.json`` existed (lmforge 0.1).

    Such a run is a fine-tuning run if its config has ``task`` and ``base`` (its LoRA flag is
    ``lora.rank > 0``), an import if its only checkpoint has weights and no trainer state, and
    pretraining otherwise. A warning says that it was inferred.
    """
    run_dir = Path(run_dir)
    try:
        config = yaml.safe_load((run_dir / CONFIG).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"'{run_dir}' has no {RUN_INFO} and no readable {CONFIG} ({e})") from None
    if "task" in config and "base" in config:
        info = RunInfo("finetune", config["task"], lora=(config.get("lora") or {}).get("rank", 0) > 0, version="")
    else:
        ckpts = list_checkpoints(run_dir)
        imported = len(ckpts) == 1 and not (ckpts[0] / TRAINER_STATE).exists()
        info = RunInfo("imported" if imported else "pretrain", "lm", version="")
    warnings.warn(f"'{run_dir}' has no {RUN_INFO} (written by lmforge 0.1): read it as kind={info.kind}, "
                  f"task={info.task}, lora={info.lora}", stacklevel=2)
    return info


def is_run_dir(path: str | Path) -> bool:
    """Whether ``path`` is an lmforge run directory (it has run.json, or config.yaml in older runs)."""
    p = Path(path)
    return (p / RUN_INFO).is_file() or (p / CONFIG).is_file()


def fresh_run_dir(out_dir: str | Path) -> Path:
    """``out_dir`` if it holds no run yet, else the first free ``out_dir-2``, ``-3``, ... (never overwrite)."""
    base = Path(out_dir)
    candidate, n = base, 1
    while is_run_dir(candidate):
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def open_run_dir(out_dir: str | Path, resume: bool) -> tuple[Path, Path | None]:
    """(run directory, checkpoint to resume from): ``out_dir`` and its latest checkpoint when resuming,
    else a fresh directory (see :func:`fresh_run_dir`) and no checkpoint."""
    if resume:
        run_dir = Path(out_dir)
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise UserError(f"cannot resume: '{run_dir}' has no checkpoint")
        return run_dir, ckpt
    return fresh_run_dir(out_dir), None


def run_config_path(run_dir: str | Path) -> Path:
    """The config.yaml of an existing run; UserError if ``run_dir`` is not a run directory."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise UserError(f"'{run_dir}' is not a run directory (no {CONFIG})")
    return path


# --------------------------------------------------------------------------------------------------
# Checkpoints


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step_{step:06d}"


def has_weights(ckpt: Path) -> bool:
    """Whether a checkpoint directory holds weights: full (model.safetensors) or LoRA adapters."""
    return (ckpt / WEIGHTS).is_file() or (ckpt / ADAPTER).is_file()


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")
                  and not p.name.endswith(".tmp") and has_weights(p))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint ``latest`` names, else the newest complete one, else None."""
    root = Path(run_dir) / CHECKPOINTS
    pointer = root / LATEST
    if pointer.is_file():
        path = root / pointer.read_text(encoding="utf-8").strip()
        if has_weights(path):
            return path
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def set_latest(ckpt: Path) -> None:
    """Point the run's ``latest`` at checkpoint directory ``ckpt`` (atomically)."""
    write_text_atomic(ckpt.parent / LATEST, ckpt.name)


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """(run_dir, checkpoint_dir) for a run directory or one of its checkpoint directories."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"'{p}' does not exist (expected a run directory or a checkpoint directory)")
    if has_weights(p) and p.parent.name == CHECKPOINTS:
        return p.parent.parent, p
    if is_run_dir(p):
        ckpt = latest_checkpoint(p)
        if ckpt is None:
            raise UserError(f"run directory '{p}' has no checkpoint yet")
        return p, ckpt
    raise UserError(f"'{p}' is not a run directory (no {CONFIG}) nor a checkpoint (no {WEIGHTS})")


# --------------------------------------------------------------------------------------------------
# Files of particular runs


def save_labels(run_dir: Path, labels: list[str]) -> None:
    """A classification run's class names, in class-id order."""
    (Path(run_dir) / LABELS).write_text(json.dumps(labels, indent=1) + "\n", encoding="utf-8")


def load_labels(run_dir: Path) -> list[str]:
    path = Path(run_dir) / LABELS
    if not path.is_file():
        raise UserError(f"'{run_dir}' has no {LABELS}: it is not a classification run")
    return json.loads(path.read_text(encoding="utf-8"))


def cache_root() -> Path:
    """Where lmforge caches what it can rebuild (prepared default corpus, measured peak FLOP/s):
    ``$LMFORGE_CACHE``, or ``~/.cache/lmforge``."""
    return Path(os.environ.get("LMFORGE_CACHE") or Path.home() / ".cache" / "lmforge")
