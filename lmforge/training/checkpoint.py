"""Checkpoints: atomic, keep-last-K, and complete enough to resume bit-exactly.

Where the files go is the run directory's business (:mod:`lmforge.rundir`); this module writes and
reads what is in them: weights, optimizer moments, RNG states and the :class:`TrainerState`.

A checkpoint is written into ``step_N.tmp`` and renamed into place only when complete; ``latest``
is replaced with os.replace. A crash at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from lmforge import rundir
from lmforge.errors import UserError
from lmforge.testhooks import fault_point


@dataclass
class TrainerState:
    """The training loop's own state, saved with every checkpoint (``trainer.json``)."""

    step: int = 0
    """Optimizer steps taken."""
    best_val_loss: float = math.inf
    """The lowest val loss of any evaluation so far (early stopping compares against it)."""
    evals_without_improvement: int = 0
    """Evaluations since the best one (early stopping stops at train.patience)."""
    train_time_s: float = 0.0
    """Training wall time so far, across resumes (the figures reported; train.max_minutes counts only
    the current process's)."""
    log_loss_sum: float = 0.0
    """The summed loss of the steps since the last log line (a resumed run logs what an uninterrupted one would)."""
    log_steps: int = 0
    """How many steps that sum holds (non-finite ones skipped are not among them)."""
    nonfinite_in_a_row: int = 0
    """Non-finite steps in a row up to this step (train.max_nonfinite_steps counts them across a resume)."""
    planned_steps: int = 0
    """The step count that train.budget_minutes planned (0: not planned); a resume trains to it."""
    global_batch: int = 0
    """Sequences per optimizer step over all processes (0: not recorded); a resume must keep it."""
    precision: str = ""
    """The precision the run trains in ('': not recorded); a resume with train.precision=auto keeps it."""


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


def _optimizer_tensors(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (safetensors) and plain JSON data."""
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_state_dict(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """The optimizer state dict that :func:`_optimizer_tensors` split."""
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    for key, v in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def _write_checkpoint(run_dir: Path, step: int, write: Callable[[Path], None]) -> Path:
    """Checkpoint ``step`` of a run, atomically: ``write(tmp)`` fills a temporary directory, a manifest
    of its files is written last, files and directories are fsync'd, then it is renamed into place and
    ``latest`` moves to it. On any failure the temporary directory is removed and ``latest`` stays.
    """
    final = rundir.checkpoint_dir(run_dir, step)
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    rundir.remove_temporary_checkpoints(run_dir)
    tmp = final.with_name(final.name + ".tmp")
    try:
        hint = ("the previous checkpoint is intact: free some space, then run again with --resume"
                if rundir.list_checkpoints(run_dir) else "no checkpoint of this run was written yet: free some "
                "space, then run the command again")
        with rundir.storage_errors(final, "writing checkpoint", hint):
            tmp.mkdir()
            write(tmp)
            rundir.write_manifest(tmp)
            fault_point("after_manifest")
            rundir.fsync_path(tmp)
            if final.exists():  # re-saving the same step (e.g. final save right after a periodic one)
                shutil.rmtree(final)
            os.rename(tmp, final)
            rundir.fsync_path(root)
            fault_point("before_latest")
            rundir.set_latest(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def save_checkpoint(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: TrainerState, keep_last: int,
                    write_weights: Callable[[Path], None] | None = None,
                    optimizer_state: dict | None = None) -> Path:
    """Write checkpoint ``state.step`` (see :func:`_write_checkpoint`), then prune all but the newest
    ``keep_last`` (only once the new one is in place).

    write_weights(dir) writes the weights instead of ``model.safetensors`` of ``model`` (LoRA: only the
    adapters; FSDP: the weights gathered from every rank); ``optimizer_state`` is saved instead of
    ``optimizer.state_dict()`` (FSDP: gathered in the same numbering).
    """
    def write(tmp: Path) -> None:
        if write_weights is None:
            save_model(model, str(tmp / rundir.WEIGHTS))
        else:
            write_weights(tmp)
        fault_point("after_weights_file")
        tensors, optim_meta = _optimizer_tensors(optimizer.state_dict() if optimizer_state is None
                                                 else optimizer_state)
        tensors.update({f"rng.{k}": v for k, v in rng_state().items()})
        save_file(tensors, str(tmp / rundir.TRAINER_TENSORS))
        fault_point("after_trainer_tensors")
        meta = {**asdict(state), "optimizer": optimizer_meta_jsonable(optim_meta)}
        (tmp / rundir.TRAINER_STATE).write_text(json.dumps(meta), encoding="utf-8")
        fault_point("after_trainer_state")

    final = _write_checkpoint(run_dir, state.step, write)
    for old in rundir.list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        # Renamed first: a crash mid-delete leaves a temporary directory (removed by the next save),
        # never a half-deleted checkpoint.
        doomed = old.with_name(old.name + ".tmp")
        os.rename(old, doomed)
        fault_point("during_rotation")
        shutil.rmtree(doomed, ignore_errors=True)
    return final


def save_weights_only(run_dir: Path, step: int, model: torch.nn.Module,
                      tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """A checkpoint with weights and no trainer state (an imported or compressed model), written the same way.

    tensors: stored instead of ``model``'s state dict (a quantized model's form on disk).
    """
    def write(tmp: Path) -> None:
        if tensors is None:
            save_model(model, str(tmp / rundir.WEIGHTS))
        else:
            save_file(tensors, str(tmp / rundir.WEIGHTS))

    return _write_checkpoint(run_dir, step, write)


def optimizer_meta_jsonable(meta: dict) -> dict:
    """Optimizer param_groups hold tensors on some PyTorch versions (e.g. lr); store them as floats."""
    groups = []
    for g in meta["param_groups"]:
        groups.append({k: (v.item() if torch.is_tensor(v) else v) for k, v in g.items()})
    scalars = {k: (v.item() if torch.is_tensor(v) else v) for k, v in meta["scalars"].items()}
    return {"param_groups": groups, "scalars": scalars}


def mismatch_detail(e: RuntimeError) -> str:
    """The telling line of ``load_state_dict``'s error (its first line only names the model class)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return next((line for line in lines if "size mismatch" in line), lines[0] if lines else type(e).__name__)


def load_weights(model: torch.nn.Module, ckpt: Path) -> None:
    """Load model.safetensors into ``model``; a shape mismatch is a user error (wrong checkpoint)."""
    try:
        missing, unexpected = load_model(model, str(ckpt / rundir.WEIGHTS), strict=False)
    except RuntimeError as e:
        raise UserError(f"checkpoint '{ckpt}' does not fit this model: {mismatch_detail(e)}") from None
    if missing or unexpected:  # (sets, in some safetensors versions)
        raise _does_not_fit(ckpt, missing, unexpected)


def _does_not_fit(ckpt: Path, missing: set[str] | list[str], unexpected: set[str] | list[str]) -> UserError:
    return UserError(f"checkpoint '{ckpt}' does not fit this model: missing {sorted(missing)[:3]}, unexpected "
                     f"{sorted(unexpected)[:3]} (were model.* settings changed since it was written?)")


def trainer_meta(ckpt: Path) -> dict:
    """A checkpoint's trainer.json: the :class:`TrainerState` fields and the optimizer's JSON part."""
    return json.loads((ckpt / rundir.TRAINER_STATE).read_text(encoding="utf-8"))


def read_trainer_state(ckpt: Path) -> tuple[TrainerState, dict, dict[str, torch.Tensor]]:
    """A checkpoint's trainer state, optimizer state dict and RNG tensors."""
    meta = trainer_meta(ckpt)
    tensors = load_file(str(ckpt / rundir.TRAINER_TENSORS))
    optimizer_sd = _optimizer_state_dict(tensors, meta.pop("optimizer"))
    return TrainerState(**meta), optimizer_sd, {k: v for k, v in tensors.items() if k.startswith("rng.")}


def read_full_weights(ckpt: Path, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """model.safetensors of ``ckpt``, checked against the model's weight shapes (a UserError names what does
    not fit, as :func:`load_weights` does)."""
    weights = load_file(str(ckpt / rundir.WEIGHTS))
    missing, unexpected = set(shapes) - set(weights), set(weights) - set(shapes)
    if missing or unexpected:
        raise _does_not_fit(ckpt, missing, unexpected)
    for name, shape in shapes.items():
        if tuple(weights[name].shape) != shape:
            raise UserError(f"checkpoint '{ckpt}' does not fit this model: size mismatch for {name}: "
                            f"{tuple(weights[name].shape)} in the checkpoint, {shape} in this model")
    return weights


def load_trainer_state(ckpt: Path, optimizer: torch.optim.Optimizer) -> TrainerState:
    """Restore optimizer and RNG state; return the trainer's state (step, best loss, ...)."""
    state, optimizer_sd, rng = read_trainer_state(ckpt)
    optimizer.load_state_dict(optimizer_sd)
    set_rng_state(rng)
    return state
