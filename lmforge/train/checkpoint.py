"""Checkpoints: atomic, keep-last-K, and complete enough to resume bit-exactly.

Layout of a run directory::

    run/
      config.yaml                 the full resolved TrainConfig
      tokenizer.json, meta.json   copied from the dataset, so a run is self-contained
      checkpoints/
        step_000500/
          model.safetensors       weights (no pickle)
          trainer.safetensors     optimizer moments + RNG states as tensors
          trainer.json            step, optimizer hyper-parameters, best val loss, ...
        latest                    text file naming the newest complete checkpoint

A checkpoint is written into ``step_N.tmp`` and renamed into place only when complete; ``latest``
is replaced with os.replace. A crash at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from lmforge.errors import UserError

CKPT_DIR = "checkpoints"


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def rng_state() -> dict[str, torch.Tensor]:
    """PyTorch's RNG states (dropout); data order needs none: batches derive from (seed, step)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda{i}"] = s
    return state


def set_rng_state(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted(k for k in tensors if k.startswith("rng.cuda"))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (safetensors) and plain JSON data."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    for key, v in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict, keep_last: int,
                    write_weights: Callable[[Path], None] | None = None) -> Path:
    """Write checkpoint ``step`` atomically, point ``latest`` at it, and prune old ones.

    write_weights(dir) writes the weights instead of ``model.safetensors`` (LoRA: only the adapters).
    """
    root = Path(run_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    if write_weights is None:
        save_model(model, str(tmp / "model.safetensors"))
    else:
        write_weights(tmp)
    tensors, optim_meta = _optimizer_tensors(optimizer)
    tensors.update({f"rng.{k}": v for k, v in rng_state().items()})
    save_file(tensors, str(tmp / "trainer.safetensors"))
    meta = {**trainer_state, "step": step, "optimizer": optimizer_meta_jsonable(optim_meta)}
    (tmp / "trainer.json").write_text(json.dumps(meta), encoding="utf-8")
    if final.exists():  # re-saving the same step (e.g. final save right after a periodic one)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _write_text_atomic(root / "latest", final.name)
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_weights_only(run_dir: Path, step: int, model: torch.nn.Module) -> Path:
    """A checkpoint with weights and no trainer state (an imported model), written atomically."""
    root = Path(run_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final, tmp = root / f"step_{step:06d}", root / f"step_{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    os.rename(tmp, final)
    _write_text_atomic(root / "latest", final.name)
    return final


def optimizer_meta_jsonable(meta: dict) -> dict:
    """Optimizer param_groups hold tensors on some PyTorch versions (e.g. lr); store them as floats."""
    groups = []
    for g in meta["param_groups"]:
        groups.append({k: (v.item() if torch.is_tensor(v) else v) for k, v in g.items()})
    scalars = {k: (v.item() if torch.is_tensor(v) else v) for k, v in meta["scalars"].items()}
    return {"param_groups": groups, "scalars": scalars}


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")
                  and not p.name.endswith(".tmp") and has_weights(p))


def has_weights(ckpt: Path) -> bool:
    """Whether a checkpoint directory holds weights: full (model.safetensors) or LoRA adapters."""
    return (ckpt / "model.safetensors").is_file() or (ckpt / "adapter.safetensors").is_file()


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    root = Path(run_dir) / CKPT_DIR
    pointer = root / "latest"
    if pointer.is_file():
        path = root / pointer.read_text(encoding="utf-8").strip()
        if has_weights(path):
            return path
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def load_weights(model: torch.nn.Module, ckpt: Path) -> None:
    """Load model.safetensors into ``model``; a shape mismatch is a user error (wrong checkpoint)."""
    try:
        missing, unexpected = load_model(model, str(ckpt / "model.safetensors"), strict=False)
    except RuntimeError as e:
        raise UserError(f"checkpoint '{ckpt}' does not fit this model: {str(e).splitlines()[0]}") from None
    if missing or unexpected:
        raise UserError(f"checkpoint '{ckpt}' does not fit this model: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}")


def load_trainer_state(ckpt: Path, optimizer: torch.optim.Optimizer) -> dict:
    """Restore optimizer and RNG state; return the trainer's JSON state (step, best loss, ...)."""
    meta = json.loads((ckpt / "trainer.json").read_text(encoding="utf-8"))
    tensors = load_file(str(ckpt / "trainer.safetensors"))
    _load_optimizer(optimizer, tensors, meta["optimizer"])
    set_rng_state(tensors)
    return meta
